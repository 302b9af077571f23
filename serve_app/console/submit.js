// Submit: a form per task type generated from GET /v1/task-types (JSON schemas). A `blob` field becomes a file
// picker that uploads through POST /v1/files; a 422 is shown at the field its `param` names.
import {ApiError, api, uploadFile} from './api.js';
import {h, replace} from './dom.js';

const FIRST = ['blob', 'url', 'goal', 'desktop', 'kind', 'question', 'message', 'messages', 'categories'];

/** The schema of a property with `anyOf: [X, null]` and `$ref` resolved. */
function resolve(schema, root) {
  let s = schema || {};
  let nullable = false;
  if (Array.isArray(s.anyOf)) {
    const options = s.anyOf.filter((o) => o.type !== 'null');
    nullable = options.length < s.anyOf.length;
    s = {...(options.length === 1 ? options[0] : {}), ...s, anyOf: undefined, type: options.length === 1 ? options[0].type : undefined};
    if (options.length === 1 && options[0].$ref) s.$ref = options[0].$ref;
  }
  if (s.$ref && s.$ref.startsWith('#/$defs/')) s = {...(root.$defs || {})[s.$ref.slice(8)], description: s.description};
  return {...s, nullable};
}

function kindOf(name, s) {
  if (name === 'blob' && s.type === 'string') return 'upload';
  if (Array.isArray(s.enum)) return 'enum';
  if (s.type === 'boolean') return 'boolean';
  if (s.type === 'integer' || s.type === 'number') return 'number';
  if (s.type === 'string') return name !== 'url' && (s.maxLength || 0) > 500 || ['goal', 'message', 'question', 'instructions'].includes(name) ? 'text' : 'string';
  if (s.type === 'array' && s.items && (s.items.type === 'string' || Array.isArray(s.items.enum))) return 'lines';
  return 'json';
}

function fieldControl(name, s, required) {
  const id = `f-${name}`;
  const describedBy = `err-${name} help-${name}`;
  const kind = kindOf(name, s);
  const common = {id, name, 'aria-describedby': describedBy};
  let control;
  if (kind === 'upload') control = h('input', {...common, type: 'file'});
  else if (kind === 'enum') {
    control = h('select', common, required || s.default !== undefined ? null : h('option', {value: ''}, '—'),
      s.enum.map((v) => h('option', {value: String(v)}, String(v))));
    if (s.default !== undefined && s.default !== null) control.value = String(s.default);
  } else if (kind === 'boolean') control = h('input', {...common, type: 'checkbox', checked: Boolean(s.default)});
  else if (kind === 'number') {
    control = h('input', {...common, type: 'number', step: s.type === 'integer' ? '1' : 'any', min: s.minimum ?? s.exclusiveMinimum,
      max: s.maximum ?? s.exclusiveMaximum, placeholder: s.default ?? ''});
  } else if (kind === 'string') {
    const type = name === 'password' ? 'password' : name === 'url' ? 'url' : 'text';
    control = h('input', {...common, type, placeholder: s.default ?? (name === 'url' ? 'https://…' : '')});
  }
  else if (kind === 'text') control = h('textarea', {...common, rows: 3});
  else if (kind === 'lines') control = h('textarea', {...common, rows: 3, placeholder: 'one per line'});
  else control = h('textarea', {...common, rows: 3, class: 'code', placeholder: s.default != null ? JSON.stringify(s.default) : 'JSON'});
  control.required = Boolean(required) && kind !== 'boolean' && kind !== 'upload';
  const label = (s.title || name) + (required ? ' *' : '');
  const help = [kind === 'upload' ? 'uploaded through /v1/files' : '', s.description || ''].filter(Boolean).join(' — ');
  return {name, kind, control, element: h('div', {class: `field-row kind-${kind}`, dataset: {field: name}},
    h('label', {for: id}, kind === 'upload' ? 'File' : label), control,
    h('small', {id: `help-${name}`, class: 'muted'}, help),
    h('p', {id: `err-${name}`, class: 'field-error', role: 'alert'}))};
}

async function readField(field) {
  const c = field.control;
  switch (field.kind) {
    case 'upload': {
      if (!c.files || !c.files[0]) return undefined;
      const ref = await uploadFile(c.files[0]);
      return ref.ref;
    }
    case 'boolean': return c.checked;
    case 'number': return c.value === '' ? undefined : Number(c.value);
    case 'enum': case 'string': case 'text': return c.value === '' ? undefined : c.value;
    case 'lines': {
      const lines = c.value.split('\n').map((l) => l.trim()).filter(Boolean);
      return lines.length ? lines : undefined;
    }
    default: {
      if (!c.value.trim()) return undefined;
      try { return JSON.parse(c.value); } catch { throw new FieldError(field.name, 'not valid JSON'); }
    }
  }
}

class FieldError extends Error {
  constructor(field, message) { super(message); this.field = field; }
}

export async function renderSubmit(main, selected, signal) {
  const types = (await api('/v1/task-types', {signal})).data;
  const typeSelect = h('select', {id: 'task-type', onchange: () => { location.hash = `#/submit/${encodeURIComponent(typeSelect.value)}`; }},
    types.map((t) => h('option', {value: t.type}, t.type)));
  const chosen = types.find((t) => t.type === selected) || types.find((t) => t.type === 'contract_extraction') || types[0];
  typeSelect.value = chosen.type;
  const schema = chosen.input_schema;
  const required = new Set(schema.required || []);
  const names = Object.keys(schema.properties || {}).filter((n) => n !== 'file'); // inline base64: use the upload
  names.sort((a, b) => {
    const rank = (n) => (required.has(n) ? 0 : FIRST.includes(n) ? 1 + FIRST.indexOf(n) / 100 : 2);
    return rank(a) - rank(b);
  });
  const fields = names.map((n) => fieldControl(n, resolve(schema.properties[n], schema), required.has(n)));
  const basic = fields.filter((f) => required.has(f.name) || FIRST.includes(f.name));
  const more = fields.filter((f) => !basic.includes(f));
  const formError = h('p', {class: 'error', id: 'form-error', role: 'alert'});
  const submit = h('button', {type: 'submit', class: 'primary'}, 'Submit');
  const form = h('form', {class: 'card task-form', novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    for (const el of form.querySelectorAll('.field-error')) el.textContent = '';
    for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
    formError.textContent = '';
    submit.disabled = true;
    try {
      const input = {};
      for (const field of fields) {
        const value = await readField(field);
        if (value !== undefined && !(field.kind === 'boolean' && value === Boolean(resolve(schema.properties[field.name], schema).default))) {
          input[field.name] = value;
        }
      }
      const task = await api('/v1/tasks', {method: 'POST', body: {type: chosen.type, input}});
      location.hash = `#/tasks/${encodeURIComponent(task.id)}`;
    } catch (err) {
      showError(err);
    } finally { submit.disabled = false; }
  }},
  h('div', {class: 'field-row'}, h('label', {for: 'task-type'}, 'Task type'), typeSelect),
  h('p', {class: 'muted'}, chosen.description || ''),
  basic.map((f) => f.element),
  more.length ? h('details', null, h('summary', null, `More options (${more.length})`), more.map((f) => f.element)) : null,
  formError, submit);

  function showError(err) {
    let name = err instanceof FieldError ? err.field : null;
    if (!name && err instanceof ApiError && err.param) {
      const match = /^input[.[]([^.[\]]+)/.exec(err.param);
      if (match) name = match[1];
    }
    const field = fields.find((f) => f.name === name);
    const text = err instanceof ApiError ? `${err.status} ${err.code}: ${err.message}` : err.message;
    if (field) {
      const details = field.element.closest('details');
      if (details) details.open = true;
      field.element.querySelector('.field-error').textContent = text;
      field.control.setAttribute('aria-invalid', 'true');
      field.control.focus();
    } else {
      formError.textContent = text;
    }
  }

  replace(main, h('h1', null, 'Submit a task'), form);
}
