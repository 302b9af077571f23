// The public REST API with the signed-in key. The key lives in this tab's sessionStorage only: never in a URL,
// never logged. Task events come over fetch() + a stream parser because EventSource cannot send Authorization.

const KEY_NAME = 'kimiray.apiKey';

export function getKey() { return sessionStorage.getItem(KEY_NAME) || ''; }
export function setKey(key) { sessionStorage.setItem(KEY_NAME, key); }
export function clearKey() { sessionStorage.removeItem(KEY_NAME); }

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.param = error.param || null;
  }
}

function headers(extra) {
  const out = {...(extra || {})};
  const key = getKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const err = new ApiError(response.status, body);
  if (response.status === 401) window.dispatchEvent(new CustomEvent('kimiray:unauthorized', {detail: err.message}));
  return err;
}

/** fetch() with the key; JSON in and out; non-2xx -> ApiError (401 also tells the app to show sign-in). */
export async function api(path, {method = 'GET', body, raw = false, contentType, signal} = {}) {
  const init = {method, headers: headers(), signal};
  if (body !== undefined) {
    if (contentType) {
      init.headers['Content-Type'] = contentType;
      init.body = body;
    } else {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorFrom(response);
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

/** Upload a File through POST /v1/files; returns the stored ref object. */
export function uploadFile(file) {
  return api('/v1/files', {method: 'POST', body: file, contentType: file.type || 'application/octet-stream'});
}

/** A same-origin object URL for an authenticated resource (images, videos, downloads). */
export async function objectUrl(path) {
  const response = await api(path, {raw: true});
  return URL.createObjectURL(await response.blob());
}

/** Save an authenticated resource as a file. */
export async function download(path, filename) {
  const url = await objectUrl(path);
  saveUrl(url, filename);
}

export function saveUrl(url, filename) {
  const a = document.createElement('a');
  a.href = url;
  a.download = filename || 'download';
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** Parse a text/event-stream body: yields {id, event, data} per event (comments and retry lines skipped). */
export async function* parseSse(response, signal) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const abort = () => reader.cancel().catch(() => {});
  if (signal) signal.addEventListener('abort', abort, {once: true});
  let buffer = '';
  let event = {id: null, event: 'message', data: []};
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf('\n')) >= 0) {
        let line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        if (line.endsWith('\r')) line = line.slice(0, -1);
        if (line === '') {
          if (event.data.length) yield {id: event.id, event: event.event, data: event.data.join('\n')};
          event = {id: null, event: 'message', data: []};
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'data') event.data.push(val);
        else if (field === 'event') event.event = val;
        else if (field === 'id') event.id = val;
      }
    }
  } finally {
    if (signal) signal.removeEventListener('abort', abort);
  }
}

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
export const isTerminal = (status) => TERMINAL.has(status);

/**
 * Follow a task's events until the task ends or `signal` aborts; after a dropped connection, reconnect with
 * Last-Event-ID so no event is missed or repeated. `onEvent(taskEvent)`; `onState('live'|'reconnecting')`.
 */
export async function followTask(taskId, {onEvent, onState, signal, after = 0}) {
  let last = after;
  for (;;) {
    if (signal && signal.aborted) return;
    try {
      const init = {headers: headers(last ? {'Last-Event-ID': String(last)} : {}), signal};
      const response = await fetch(`/v1/tasks/${encodeURIComponent(taskId)}/events`, init);
      if (!response.ok) throw await errorFrom(response);
      if (onState) onState('live');
      let ended = false;
      for await (const message of parseSse(response, signal)) {
        const event = JSON.parse(message.data);
        last = Number(message.id || event.id || last);
        onEvent(event);
        if (event.type === 'status' && isTerminal(event.data && event.data.status)) ended = true;
      }
      if (ended) return;
      // the server closes the stream after the ending event; a stream that closed early is resumed
      const task = await api(`/v1/tasks/${encodeURIComponent(taskId)}`, {signal});
      if (isTerminal(task.status) && task.last_event_id <= last) return;
    } catch (err) {
      if (signal && signal.aborted) return;
      if (err instanceof ApiError && err.status >= 400 && err.status < 500) throw err;
    }
    if (onState) onState('reconnecting');
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

/** Stream a chat completion: calls onDelta({content, reasoning}) per chunk; resolves with the final text. */
export async function streamChat(body, {onDelta, signal}) {
  const response = await fetch('/v1/chat/completions', {
    method: 'POST', signal,
    headers: headers({'Content-Type': 'application/json'}),
    body: JSON.stringify({...body, stream: true}),
  });
  if (!response.ok) throw await errorFrom(response);
  let finish = null;
  for await (const message of parseSse(response, signal)) {
    if (message.data === '[DONE]') break;
    const chunk = JSON.parse(message.data);
    if (chunk.error) throw new ApiError(chunk.error.code === 'generation_failed' ? 500 : 502, chunk);
    const choice = (chunk.choices || [])[0];
    if (!choice) continue;
    const delta = choice.delta || {};
    onDelta({content: delta.content || '', reasoning: delta.reasoning_content || ''});
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  return finish;
}
