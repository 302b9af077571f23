// DOM helpers. Every piece of text goes in through text nodes (never innerHTML), so model output, file names and
// document text stay text whatever they contain.

/** Element `tag` with attributes (`on*` = listeners, `class`, `dataset`) and children (nodes or text). */
export function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') node.addEventListener(key.slice(2), value);
    else if (key === 'class') node.className = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key === 'value') node.value = value;
    else if (key === 'checked') node.checked = Boolean(value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  append(node, children);
  return node;
}

export function append(node, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace the children of `node`. */
export function replace(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

const SVG = 'http://www.w3.org/2000/svg';

export function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  for (const child of children.flat()) if (child) node.append(child);
  return node;
}

export function badge(text, kind) {
  return h('span', {class: `badge badge-${kind || String(text).replace(/[^a-z_]/gi, '')}`}, text);
}

export function fmtTime(seconds) {
  if (!seconds) return '';
  return new Date(seconds * 1000).toLocaleString();
}

export function json(value) {
  return h('pre', {class: 'json'}, JSON.stringify(value, null, 2));
}

/** Percent string for CSSOM positioning (no inline style attributes: the CSP forbids them). */
export function pct(part, whole) {
  return `${Math.max(0, Math.min(100, (100 * part) / (whole || 1)))}%`;
}
