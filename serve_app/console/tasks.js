// Tasks list: status/type filters, cursor pagination, rows of running tasks updated live from their event streams.
import {api, followTask, isTerminal} from './api.js';
import {badge, fmtTime, h, replace} from './dom.js';

const STATUSES = ['', 'queued', 'running', 'succeeded', 'failed', 'cancelled'];
const LIVE_STREAMS = 3; // browsers allow ~6 connections per host over HTTP/1.1: keep some for the page itself

export function progressBar(progress) {
  const bar = h('progress', {max: 1, value: 0, class: 'progress', 'aria-label': 'progress'});
  setProgress(bar, progress);
  return bar;
}

export function setProgress(bar, progress) {
  if (!progress || !progress.total) { bar.removeAttribute('value'); bar.title = ''; return; }
  bar.max = progress.total;
  bar.value = progress.done;
  bar.title = `${progress.done}/${progress.total} ${progress.message || ''}`;
}

export async function renderTasks(main, signal) {
  const state = {status: sessionStorage.getItem('kimiray.filter.status') || '',
    type: sessionStorage.getItem('kimiray.filter.type') || '', cursors: [null], page: 0};
  const types = await api('/v1/task-types', {signal});
  const statusSelect = h('select', {id: 'filter-status', onchange: () => { state.status = statusSelect.value; reset(); }},
    STATUSES.map((s) => h('option', {value: s}, s || 'any status')));
  const typeSelect = h('select', {id: 'filter-type', onchange: () => { state.type = typeSelect.value; reset(); }},
    h('option', {value: ''}, 'any type'), types.data.map((t) => h('option', {value: t.type}, t.type)));
  statusSelect.value = state.status;
  typeSelect.value = state.type;
  const tbody = h('tbody');
  const prev = h('button', {type: 'button', onclick: () => { state.page -= 1; refresh(); }}, '← Newer');
  const next = h('button', {type: 'button', onclick: () => { state.page += 1; refresh(); }}, 'Older →');
  const info = h('span', {class: 'muted', role: 'status'});
  replace(main,
    h('div', {class: 'toolbar'}, h('h1', null, 'Tasks'), h('span', {class: 'spacer'}),
      h('a', {href: '#/submit', class: 'button primary'}, 'New task')),
    h('div', {class: 'filters'},
      h('label', {for: 'filter-status'}, 'Status'), statusSelect,
      h('label', {for: 'filter-type'}, 'Type'), typeSelect),
    h('div', {class: 'table-wrap'}, h('table', {class: 'tasks'},
      h('thead', null, h('tr', null, ['Task', 'Type', 'Status', 'Progress', 'Created'].map((c) => h('th', {scope: 'col'}, c)))),
      tbody)),
    h('div', {class: 'pager'}, prev, info, next));

  let pageAbort = null;
  function reset() {
    sessionStorage.setItem('kimiray.filter.status', state.status);
    sessionStorage.setItem('kimiray.filter.type', state.type);
    state.cursors = [null];
    state.page = 0;
    refresh();
  }

  /** load() from an event handler: a load replaced by a newer one is not an error; others are shown. */
  function refresh() {
    load().catch((err) => {
      if (err.name !== 'AbortError' && !signal.aborted) info.textContent = `could not load the tasks: ${err.message}`;
    });
  }

  async function load() {
    if (pageAbort) pageAbort.abort();
    pageAbort = new AbortController();
    const local = pageAbort;
    signal.addEventListener('abort', () => local.abort(), {once: true});
    const params = new URLSearchParams({limit: '20'});
    if (state.status) params.set('status', state.status);
    if (state.type) params.set('type', state.type);
    const cursor = state.cursors[state.page];
    if (cursor) params.set('cursor', cursor);
    const page = await api(`/v1/tasks?${params}`, {signal: local.signal});
    state.cursors[state.page + 1] = page.next_cursor;
    prev.disabled = state.page === 0;
    next.disabled = !page.next_cursor;
    info.textContent = page.data.length ? `page ${state.page + 1}` : 'no tasks';
    replace(tbody, page.data.map(row));
    // a few streams at a time; when one ends the next running task gets it; any left over are polled
    const waiting = page.data.filter((t) => !isTerminal(t.status));
    const startNext = () => {
      const task = waiting.shift();
      if (task && !local.signal.aborted) watch(task, local.signal).finally(startNext);
    };
    for (let i = 0; i < LIVE_STREAMS; i += 1) startNext();
    if (waiting.length) {
      setTimeout(() => { if (!local.signal.aborted && waiting.length) refresh(); }, 5000);
    }
  }

  function row(task) {
    const bar = progressBar(task.progress);
    const status = h('td', {class: 'status'}, badge(task.status));
    const tr = h('tr', {dataset: {taskId: task.id}},
      h('td', null, h('a', {href: `#/tasks/${encodeURIComponent(task.id)}`}, task.id)),
      h('td', null, task.type), status, h('td', null, bar), h('td', null, fmtTime(task.created_at)));
    tr._update = (event) => {
      if (event.type === 'status') replace(status, badge(event.data.status));
      if (event.type === 'progress') setProgress(bar, event.data);
    };
    return tr;
  }

  function watch(task, localSignal) {
    return followTask(task.id, {
      signal: localSignal,
      onEvent: (event) => {
        const tr = tbody.querySelector(`tr[data-task-id="${CSS.escape(task.id)}"]`);
        if (tr && tr._update) tr._update(event);
      },
    }).catch(() => {});
  }

  try {
    await load();
  } catch (err) {
    if (err.name !== 'AbortError') throw err; // a filter changed before the first page came: not an error
  }
}
