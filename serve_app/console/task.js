// One task: status, progress bar, cancel, the live event log (resumed with Last-Event-ID), result, artifacts,
// and a view per task type (contract review, OS agent steps, video timeline).
import {api, download, followTask, isTerminal} from './api.js';
import {badge, fmtTime, h, json, replace} from './dom.js';
import {progressBar, setProgress} from './tasks.js';
import {contractView} from './contract.js';
import {osAgentView} from './osagent.js';
import {videoView} from './video.js';

const VIEWS = {contract_extraction: contractView, os_agent: osAgentView, video_analysis: videoView};

function eventSummary(event) {
  const data = event.data || {};
  if (event.type === 'status') return data.status + (data.error ? `: ${data.error.message || data.error}` : '');
  if (event.type === 'progress') return `${data.done}/${data.total ?? '?'} ${data.message || ''}`;
  if (event.type === 'step') return data.name ? `${data.name}` : JSON.stringify(data);
  if (event.type === 'step_result') return `step ${data.index + 1}: ${data.status}${data.detail ? ` - ${data.detail}` : ''}`;
  return JSON.stringify(data).slice(0, 300);
}

/** The input for display: long strings (inline base64 files) cut, so a large input stays readable. */
function shorten(value) {
  if (typeof value === 'string') return value.length > 300 ? `${value.slice(0, 300)}… (${value.length} chars)` : value;
  if (Array.isArray(value)) return value.map(shorten);
  if (value && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, shorten(v)]));
  return value;
}

export async function renderTask(main, taskId, signal) {
  let task = await api(`/v1/tasks/${encodeURIComponent(taskId)}`, {signal});
  const statusCell = h('span', {id: 'task-status'}, badge(task.status));
  const bar = progressBar(task.progress);
  const progressText = h('span', {class: 'muted'}, task.progress ? task.progress.message : '');
  const connection = h('span', {class: 'muted', id: 'stream-state', role: 'status'});
  const cancel = h('button', {type: 'button', id: 'cancel', class: 'danger', onclick: async () => {
    cancel.disabled = true;
    try {
      task = await api(`/v1/tasks/${encodeURIComponent(taskId)}/cancel`, {method: 'POST'});
      cancel.textContent = task.cancel_requested && !isTerminal(task.status) ? 'Cancelling…' : 'Cancel';
      showResult();
    } catch (err) { cancel.disabled = false; errorBox.textContent = err.message; }
  }}, 'Cancel');
  cancel.hidden = isTerminal(task.status);
  const errorBox = h('p', {class: 'error', role: 'alert'});
  const log = h('ol', {class: 'events', id: 'events', 'aria-live': 'polite'});
  const resultBox = h('section', {id: 'result', 'aria-label': 'Result'});
  const artifacts = h('section', {id: 'artifacts', 'aria-label': 'Artifacts'});
  const make = VIEWS[task.type];
  const view = make ? make(task, signal) : null;

  replace(main,
    h('div', {class: 'toolbar'}, h('a', {href: '#/tasks'}, '← Tasks'), h('span', {class: 'spacer'}), cancel),
    h('h1', null, `${task.type} `, h('code', null, task.id)),
    h('div', {class: 'meta'}, statusCell, bar, progressText, connection,
      h('span', {class: 'muted'}, `created ${fmtTime(task.created_at)}`)),
    errorBox,
    view ? view.element : null,
    h('div', {class: 'columns'},
      h('section', {class: 'card', 'aria-label': 'Events'}, h('h2', null, 'Events'), log),
      h('div', null, artifacts, resultBox,
        h('details', {class: 'card'}, h('summary', null, 'Input'), json(shorten(task.input))))));

  let viewShown = false;
  function showResult() {
    replace(statusCell, badge(task.status));
    cancel.hidden = isTerminal(task.status);
    if (task.error) errorBox.textContent = `${task.error.code}: ${task.error.message}`;
    const result = task.result;
    const files = result && typeof result === 'object' ? result.artifacts || {} : {};
    replace(artifacts, Object.keys(files).length ? h('div', {class: 'card'}, h('h2', null, 'Artifacts'),
      h('ul', null, Object.entries(files).map(([name, entry]) => h('li', null,
        h('button', {type: 'button', class: 'link', dataset: {artifact: name},
          onclick: () => download(`/v1/tasks/${encodeURIComponent(taskId)}/artifacts/${encodeURIComponent(name)}`,
            entry.filename || name).catch((err) => { errorBox.textContent = err.message; })}, entry.filename || name),
        h('span', {class: 'muted'}, ` ${entry.content_type || ''} ${entry.size ? `${Math.ceil(entry.size / 1024)} KiB` : ''}`))))) : null);
    replace(resultBox, result !== null && result !== undefined ? h('details', {class: 'card', open: !view},
      h('summary', null, 'Result JSON'), json(result)) : null);
    if (view && isTerminal(task.status) && !viewShown) {
      viewShown = true; // once: a replayed status event must not rebuild the review under the user's focus
      view.onTask(task);
    }
  }
  showResult();

  followTask(taskId, {
    signal,
    onState: (s) => { connection.textContent = s === 'live' ? '● live' : 'reconnecting…'; },
    onEvent: async (event) => {
      const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
      log.append(h('li', {dataset: {type: event.type}}, h('span', {class: 'event-id'}, `#${event.id}`), ' ',
        h('strong', null, event.type), ' ', eventSummary(event)));
      if (log.children.length > 500) log.firstElementChild.remove();
      if (atBottom) log.scrollTop = log.scrollHeight; // follow the stream unless the reader scrolled up
      if (event.type === 'progress') { setProgress(bar, event.data); progressText.textContent = event.data.message || ''; }
      if (view && view.onEvent) view.onEvent(event);
      if (event.type === 'status' && event.data.status !== task.status) {
        try {
          task = await api(`/v1/tasks/${encodeURIComponent(taskId)}`, {signal});
          showResult();
        } catch (err) {
          if (!signal.aborted) errorBox.textContent = err.message;
        }
      }
    },
  }).then(() => { if (!signal.aborted) connection.textContent = isTerminal(task.status) ? 'ended' : ''; })
    .catch((err) => { if (!signal.aborted) errorBox.textContent = err.message; });
}
