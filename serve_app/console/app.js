// The console's shell: sign-in, sign-out and a hash router (#/tasks, #/tasks/<id>, #/submit[/<type>], #/chat).
import {ApiError, api, clearKey, getKey, setKey} from './api.js';
import {h, replace} from './dom.js';
import {renderTasks} from './tasks.js';
import {renderTask} from './task.js';
import {renderSubmit} from './submit.js';
import {renderChat} from './chat.js';

const main = document.getElementById('main');
let current = null; // AbortController of the view on screen: leaving a view stops its streams

function signedIn() { return Boolean(getKey()); }

function updateChrome(route) {
  document.getElementById('nav').hidden = !signedIn();
  document.getElementById('signout').hidden = !signedIn();
  for (const link of document.querySelectorAll('[data-nav]')) {
    if (link.dataset.nav === route) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

function renderSignIn(message) {
  const input = h('input', {id: 'api-key', type: 'password', name: 'api-key', autocomplete: 'off', required: true,
    'aria-describedby': 'signin-error'});
  const error = h('p', {id: 'signin-error', class: 'error', role: 'alert'}, message || '');
  const form = h('form', {class: 'card signin', onsubmit: async (event) => {
    event.preventDefault();
    setKey(input.value.trim());
    try {
      await api('/v1/task-types');
      input.value = '';
      location.hash = '#/tasks';
      route();
    } catch (err) {
      clearKey();
      error.textContent = err instanceof ApiError ? `${err.status}: ${err.message}` : String(err);
      input.focus();
    }
  }},
  h('h1', null, 'Sign in'),
  h('p', {class: 'muted'}, 'Your API key is kept in this browser tab only and sent as a Bearer token.'),
  h('label', {for: 'api-key'}, 'API key'), input,
  h('button', {type: 'submit', class: 'primary'}, 'Sign in'), error);
  replace(main, form);
  input.focus();
}

async function route() {
  if (current) current.abort();
  current = new AbortController();
  const signal = current.signal;
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  const [page, arg] = parts;
  updateChrome(page || 'tasks');
  if (!signedIn() || page === 'signin') {
    updateChrome('signin');
    renderSignIn();
    return;
  }
  document.getElementById('who').textContent = 'signed in';
  try {
    if (page === 'tasks' && arg) await renderTask(main, arg, signal);
    else if (page === 'submit') await renderSubmit(main, arg, signal);
    else if (page === 'chat') await renderChat(main, signal);
    else await renderTasks(main, signal);
  } catch (err) {
    if (signal.aborted) return;
    if (err instanceof ApiError && err.status === 401) return; // the unauthorized handler shows sign-in
    replace(main, h('div', {class: 'card'}, h('h1', null, 'Something went wrong'),
      h('p', {class: 'error', role: 'alert'}, err instanceof ApiError ? `${err.status}: ${err.message}` : String(err))));
  }
}

window.addEventListener('kimiray:unauthorized', (event) => {
  clearKey();
  if (current) current.abort();
  updateChrome('signin');
  renderSignIn(`401: ${event.detail}`);
});

document.getElementById('signout').addEventListener('click', () => {
  clearKey();
  document.getElementById('who').textContent = '';
  location.hash = '#/signin';
  route();
});

window.addEventListener('hashchange', route);
route();
