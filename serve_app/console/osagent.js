// OS agent: each step's screenshot with the click point or drag path drawn, Approve / Deny for a
// confirmation_required event, and the final outcome and answer.
import {api, objectUrl} from './api.js';
import {badge, h, replace, svg} from './dom.js';

function actionText(action) {
  if (!action) return 'no action parsed';
  const {kind, ...rest} = action;
  return `${kind} ${JSON.stringify(rest)}`;
}

/** An SVG overlay in screen pixels: a ring at a click, an arrow for a drag. */
function actionOverlay(action, width, height) {
  const layer = svg('svg', {class: 'action-layer', viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: 'none',
    'aria-hidden': 'true'});
  if (!action || typeof action.x !== 'number' || typeof action.y !== 'number') return layer;
  const r = Math.max(6, Math.round(Math.min(width, height) / 40));
  if (typeof action.to_x === 'number' && typeof action.to_y === 'number') {
    layer.append(svg('line', {x1: action.x, y1: action.y, x2: action.to_x, y2: action.to_y, class: 'drag'}),
      svg('circle', {cx: action.to_x, cy: action.to_y, r: r / 2, class: 'drag-end'}));
  }
  layer.append(svg('circle', {cx: action.x, cy: action.y, r, class: 'click'}),
    svg('circle', {cx: action.x, cy: action.y, r: 2, class: 'click-dot'}));
  return layer;
}

export function osAgentView(task, signal) {
  const steps = h('ol', {class: 'steps', id: 'steps'});
  const pending = h('div', {id: 'confirmations'});
  const outcome = h('div', {id: 'outcome'});
  const element = h('section', {class: 'os-agent', 'aria-label': 'OS agent'},
    h('p', null, h('strong', null, 'Goal: '), String((task.input || {}).goal || '')), pending, outcome,
    h('h2', null, 'Steps'), steps);
  const seen = new Set();
  const asked = new Map();

  function addStep(record) {
    if (seen.has(record.index)) return;
    seen.add(record.index);
    const figure = h('div', {class: 'shot'});
    if (record.screenshot) {
      const img = h('img', {alt: `Screenshot before step ${record.index + 1}`});
      figure.append(img, actionOverlay(record.action, record.screen_width || 1, record.screen_height || 1));
      objectUrl(`/v1/files/${record.screenshot}`).then((url) => { img.src = url; }).catch(() => {});
    }
    steps.append(h('li', {class: 'step', dataset: {index: String(record.index)}},
      h('div', {class: 'step-head'}, h('strong', null, `Step ${record.index + 1}`), ' ', badge(record.status), ' ',
        h('code', null, actionText(record.action))),
      record.detail ? h('p', {class: 'muted'}, record.detail) : null,
      record.window_title ? h('p', {class: 'muted'}, `window: ${record.window_title}`) : null,
      figure));
  }

  function askConfirmation(data) {
    if (asked.has(data.step)) return;
    const message = h('p', {class: 'error', role: 'alert'});
    const decide = async (approve) => {
      for (const b of card.querySelectorAll('button')) b.disabled = true;
      try {
        await api(`/v1/tasks/${encodeURIComponent(task.id)}/confirm`, {method: 'POST', body: {step: data.step, approve}});
        message.textContent = approve ? 'Approved; waiting for the agent…' : 'Denied; waiting for the agent…';
      } catch (err) {
        message.textContent = err.message;
        for (const b of card.querySelectorAll('button')) b.disabled = false;
      }
    };
    const card = h('div', {class: 'card confirm', role: 'group', 'aria-label': `Confirm step ${data.step + 1}`},
      h('h3', null, `Step ${data.step + 1} needs your approval`),
      h('p', null, String(data.reason || '')), h('code', null, actionText(data.action)),
      h('div', {class: 'row'},
        h('button', {type: 'button', class: 'primary', id: `approve-${data.step}`, onclick: () => decide(true)}, 'Approve'),
        h('button', {type: 'button', class: 'danger', id: `deny-${data.step}`, onclick: () => decide(false)}, 'Deny')),
      message);
    asked.set(data.step, card);
    pending.append(card);
    card.querySelector('button').focus();
  }

  // The agent's call_user question (event input_required): a text answer, sent to POST /v1/tasks/{id}/reply.
  const questions = new Map();
  function askUser(data) {
    if (questions.has(data.step)) return;
    const message = h('p', {class: 'error', role: 'alert'});
    const input = h('input', {type: 'text', id: `reply-text-${data.step}`, maxlength: '4000',
      'aria-label': `Answer to step ${data.step + 1}`});
    const send = async () => {
      const text = input.value.trim();
      if (!text) { message.textContent = 'Type an answer first.'; return; }
      for (const el of card.querySelectorAll('button, input')) el.disabled = true;
      try {
        await api(`/v1/tasks/${encodeURIComponent(task.id)}/reply`, {method: 'POST', body: {step: data.step, text}});
        message.textContent = 'Sent; waiting for the agent…';
      } catch (err) {
        message.textContent = err.message;
        for (const el of card.querySelectorAll('button, input')) el.disabled = false;
      }
    };
    const card = h('div', {class: 'card confirm', role: 'group', 'aria-label': `Question at step ${data.step + 1}`},
      h('h3', null, `Step ${data.step + 1}: the agent asks you`), h('p', null, String(data.question || '')),
      h('div', {class: 'row'}, input,
        h('button', {type: 'button', class: 'primary', id: `reply-${data.step}`, onclick: send}, 'Send answer')),
      message);
    questions.set(data.step, card);
    pending.append(card);
    input.focus();
  }

  function onEvent(event) {
    if (event.type === 'step_result') addStep(event.data);
    if (event.type === 'confirmation_required') askConfirmation(event.data);
    if (event.type === 'input_required') askUser(event.data);
    if (event.type === 'user_reply') {
      const card = questions.get(event.data.step);
      if (card) replace(card, h('p', null, `Step ${event.data.step + 1}: you answered `,
        h('code', null, String(event.data.reply || ''))));
    }
    if (event.type === 'confirmation') {
      const card = asked.get(event.data.step);
      if (card) replace(card, h('p', null, `Step ${event.data.step + 1}: `,
        badge(event.data.approved ? 'approved' : (event.data.timed_out ? 'timed out' : 'denied'),
          event.data.approved ? 'verified' : 'unverified')));
    }
  }

  function onTask(done) {
    const result = done.result;
    for (const record of (result && result.trajectory) || []) addStep(record);
    if (!result) return;
    replace(outcome, h('div', {class: 'card'}, h('h2', null, 'Outcome '), badge(result.outcome || done.status),
      result.answer ? h('p', null, h('strong', null, 'Answer: '), String(result.answer)) : null,
      result.reason ? h('p', null, h('strong', null, 'Reason: '), String(result.reason)) : null,
      h('p', {class: 'muted'}, `${result.steps} steps, ${result.executed} executed, ${result.elapsed_s}s`)));
  }

  return {element, onEvent, onTask};
}
