// Chat playground: streaming chat completions with an optional image, JSON-schema mode, and a Thinking
// model's reasoning shown apart from the answer.
import {api, streamChat} from './api.js';
import {h, replace} from './dom.js';

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

export async function renderChat(main, signal) {
  const models = (await api('/v1/models', {signal})).data || [];
  const messages = [];
  let running = null;
  const model = h('select', {id: 'chat-model'}, models.map((m) => h('option', {value: m.id}, m.id)));
  const maxTokens = h('input', {id: 'chat-max-tokens', type: 'number', min: 1, max: 32768, value: '256'});
  const temperature = h('input', {id: 'chat-temperature', type: 'number', min: 0, max: 2, step: '0.1', value: '0.7'});
  const jsonMode = h('input', {id: 'chat-json', type: 'checkbox'});
  const schema = h('textarea', {id: 'chat-schema', rows: 4, class: 'code', 'aria-describedby': 'chat-schema-help',
    value: '{"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}'});
  const image = h('input', {id: 'chat-image', type: 'file', accept: 'image/*'});
  const text = h('textarea', {id: 'chat-input', rows: 3, required: true});
  const log = h('div', {class: 'chat-log', id: 'chat-log', 'aria-live': 'polite'});
  const error = h('p', {class: 'error', role: 'alert'});
  const send = h('button', {type: 'submit', class: 'primary', id: 'chat-send'}, 'Send');
  const stop = h('button', {type: 'button', id: 'chat-stop', hidden: true, onclick: () => running && running.abort()}, 'Stop');
  const clear = h('button', {type: 'button', onclick: () => { messages.length = 0; replace(log); }}, 'New conversation');

  text.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });

  const form = h('form', {class: 'card chat-form', onsubmit: async (event) => {
    event.preventDefault();
    error.textContent = '';
    const prompt = text.value.trim();
    if (!prompt) return;
    let responseFormat;
    if (jsonMode.checked) {
      try {
        responseFormat = {type: 'json_schema', json_schema: {name: 'reply', schema: JSON.parse(schema.value)}};
      } catch { error.textContent = 'The JSON schema is not valid JSON.'; schema.focus(); return; }
    }
    let content = prompt;
    const userBubble = h('div', {class: 'msg user'}, h('p', null, prompt));
    if (image.files && image.files[0]) {
      const url = await readDataUrl(image.files[0]);
      content = [{type: 'text', text: prompt}, {type: 'image_url', image_url: {url}}];
      userBubble.append(h('img', {src: url, alt: image.files[0].name, class: 'thumb'}));
    }
    messages.push({role: 'user', content});
    log.append(userBubble);
    const reasoning = h('pre', {class: 'reasoning-text'});
    const reasoningBox = h('details', {class: 'reasoning', hidden: true}, h('summary', null, 'Reasoning'), reasoning);
    const answer = h('div', {class: 'answer'});
    const bubble = h('div', {class: 'msg assistant'}, reasoningBox, answer);
    log.append(bubble);
    text.value = '';
    image.value = '';
    running = new AbortController();
    signal.addEventListener('abort', () => running && running.abort(), {once: true});
    send.disabled = true;
    stop.hidden = false;
    try {
      const body = {model: model.value, messages, max_tokens: Number(maxTokens.value) || 256,
        temperature: Number(temperature.value)};
      if (responseFormat) body.response_format = responseFormat;
      const finish = await streamChat(body, {signal: running.signal, onDelta: (d) => {
        if (d.reasoning) { reasoningBox.hidden = false; reasoning.textContent += d.reasoning; }
        if (d.content) answer.textContent += d.content;
        log.scrollTop = log.scrollHeight;
      }});
      bubble.dataset.finish = finish || '';
      messages.push({role: 'assistant', content: answer.textContent});
    } catch (err) {
      if (err.name !== 'AbortError') error.textContent = err.message;
      messages.pop();
      bubble.classList.add('failed');
    } finally {
      send.disabled = false;
      stop.hidden = true;
      running = null;
    }
  }},
  h('label', {for: 'chat-input'}, 'Message (Ctrl+Enter sends)'), text,
  h('div', {class: 'row'}, h('label', {for: 'chat-image'}, 'Image'), image),
  h('details', null, h('summary', null, 'Settings'),
    h('div', {class: 'grid2'}, h('label', {for: 'chat-model'}, 'Model'), model,
      h('label', {for: 'chat-max-tokens'}, 'Max tokens'), maxTokens,
      h('label', {for: 'chat-temperature'}, 'Temperature'), temperature,
      h('label', {for: 'chat-json'}, 'JSON-schema mode'), jsonMode),
    h('label', {for: 'chat-schema'}, 'JSON schema'), schema,
    h('small', {id: 'chat-schema-help', class: 'muted'}, 'Used when JSON-schema mode is on: the reply is constrained to it.')),
  error, h('div', {class: 'row'}, send, stop, clear));

  replace(main, h('h1', null, 'Chat playground'), h('div', {class: 'chat'}, log, form));
  text.focus();
}
