// Contract review: the PDF's pages (rendered by the server) beside the extracted fields; each value's citations
// drawn as boxes on every page they list; clicking a value scrolls to its highlight. Follow-up chat on the
// task's session and exports. Citations come in two shapes: {page, bboxes:[[x0,y0,x1,y1]...]} and cross-page
// ones ({page, page_end, parts:[{page, bboxes}...]}, or boxes that name their page); citationBoxes() reads both.
import {api, download, saveUrl, streamChat} from './api.js';
import {badge, h, pct, replace} from './dom.js';

const isBox = (b) => Array.isArray(b) && b.length === 4 && b.every((n) => typeof n === 'number');

/** Every page a citation refers to. */
export function citationPages(c) {
  const pages = new Set();
  if (Number.isInteger(c.page)) pages.add(c.page);
  for (const p of [...(Array.isArray(c.pages) ? c.pages : []), ...(Array.isArray(c.parts) ? c.parts : [])]) {
    if (Number.isInteger(p)) pages.add(p);
    else if (p && Number.isInteger(p.page)) pages.add(p.page);
  }
  const end = Number.isInteger(c.page_end) ? c.page_end : null;
  const start = Number.isInteger(c.page_start) ? c.page_start : (Number.isInteger(c.page) ? c.page : null);
  if (start !== null && end !== null && end >= start && end - start < 1000) {
    for (let p = start; p <= end; p += 1) pages.add(p);
  }
  for (const b of citationBoxes(c)) pages.add(b.page);
  return [...pages].sort((a, b) => a - b);
}

/** Every box of a citation as {page, box:[x0,y0,x1,y1]} (PDF points). */
export function citationBoxes(c) {
  const out = [];
  const defaultPage = Number.isInteger(c.page) ? c.page
    : (Array.isArray(c.pages) && Number.isInteger(c.pages[0]) ? c.pages[0] : (Number.isInteger(c.page_start) ? c.page_start : 1));
  const take = (entry, page) => {
    if (isBox(entry)) out.push({page, box: entry});
    else if (Array.isArray(entry) && entry.length === 5 && entry.every((n) => typeof n === 'number')) {
      out.push({page: entry[0], box: entry.slice(1)});
    } else if (entry && typeof entry === 'object' && !Array.isArray(entry)) {
      const p = Number.isInteger(entry.page) ? entry.page : page;
      if (isBox(entry.bbox)) out.push({page: p, box: entry.bbox});
      if (isBox(entry.box)) out.push({page: p, box: entry.box});
      for (const b of Array.isArray(entry.bboxes) ? entry.bboxes : []) take(b, p);
      if (['x0', 'y0', 'x1', 'y1'].every((k) => typeof entry[k] === 'number')) {
        out.push({page: p, box: [entry.x0, entry.y0, entry.x1, entry.y1]});
      }
    }
  };
  for (const key of ['bboxes', 'boxes']) for (const e of Array.isArray(c[key]) ? c[key] : []) take(e, defaultPage);
  for (const key of ['parts', 'spans', 'locations', 'pages']) {
    for (const e of Array.isArray(c[key]) ? c[key] : []) if (e && typeof e === 'object') take(e, defaultPage);
  }
  // a cross-page citation repeats its first part's boxes at the top level: each box once
  const seen = new Set();
  return out.filter(({page, box}) => {
    const key = `${page}:${box.join(',')}`;
    return seen.has(key) ? false : (seen.add(key), true);
  });
}

function valueText(value) {
  return typeof value === 'string' ? value : JSON.stringify(value);
}

export function contractView(task, signal) {
  const element = h('section', {class: 'review', 'aria-label': 'Contract review'},
    h('p', {class: 'muted'}, 'The review appears when the extraction finishes.'));
  const taskPath = `/v1/tasks/${encodeURIComponent(task.id)}`;

  function onTask(done) {
    const result = done.result;
    if (done.status !== 'succeeded' || !result || !Array.isArray(result.fields)) {
      replace(element);
      return;
    }
    const pages = new Map(); // page number -> {frame, overlay, img, loaded, size}
    const boxesByValue = new Map(); // value id -> [box elements]
    let active = null;

    const pageColumn = h('div', {class: 'pages', id: 'pages', tabindex: '0', 'aria-label': 'Pages'});
    const observer = new IntersectionObserver((entries) => {
      for (const entry of entries) if (entry.isIntersecting) loadPage(Number(entry.target.dataset.page));
    }, {root: pageColumn, rootMargin: '400px'});
    signal.addEventListener('abort', () => observer.disconnect(), {once: true});
    for (let n = 1; n <= (result.page_count || 1); n += 1) {
      const overlay = h('div', {class: 'overlay'});
      const img = h('img', {alt: `Page ${n}`, class: 'page-img'});
      const frame = h('figure', {class: 'page', id: `page-${n}`, dataset: {page: String(n)}},
        h('div', {class: 'page-box'}, img, overlay), h('figcaption', null, `Page ${n}`));
      pages.set(n, {frame, overlay, img, loaded: null, size: null, boxes: []});
      pageColumn.append(frame);
      observer.observe(frame);
    }

    function loadPage(n) {
      const page = pages.get(n);
      if (!page) return Promise.resolve();
      if (!page.loaded) {
        page.loaded = (async () => {
          const response = await api(`${taskPath}/pages/${n}?width=1000`, {raw: true, signal});
          page.size = [Number(response.headers.get('X-Page-Width')), Number(response.headers.get('X-Page-Height'))];
          page.img.src = URL.createObjectURL(await response.blob());
          page.frame.classList.add('loaded');
          for (const {el, box} of page.boxes) place(el, box, page.size);
        })().catch(() => { page.loaded = null; });
      }
      return page.loaded;
    }

    function place(el, box, size) {
      el.style.left = pct(box[0], size[0]);
      el.style.top = pct(box[1], size[1]);
      el.style.width = pct(box[2] - box[0], size[0]);
      el.style.height = pct(box[3] - box[1], size[1]);
    }

    async function select(valueId, firstPage) {
      if (active) for (const el of boxesByValue.get(active) || []) el.classList.remove('active');
      for (const el of element.querySelectorAll('.value.selected')) el.classList.remove('selected');
      active = valueId;
      const item = element.querySelector(`[data-value-id="${valueId}"]`);
      if (item) item.classList.add('selected');
      const els = boxesByValue.get(valueId) || [];
      for (const el of els) el.classList.add('active');
      const target = pages.get(firstPage);
      if (!target) return;
      await loadPage(firstPage);
      const first = els.find((el) => el.parentElement === target.overlay);
      (first || target.frame).scrollIntoView({block: 'center', behavior: 'smooth'});
    }

    const fieldList = h('div', {class: 'fields', id: 'fields'});
    let counter = 0;
    for (const field of result.fields) {
      const values = Array.isArray(field.values) ? field.values : [];
      const list = h('ul', {class: 'values'});
      for (const value of values) {
        counter += 1;
        const valueId = `v${counter}`;
        const citations = Array.isArray(value.citations) ? value.citations : [];
        const boxEls = [];
        let firstPage = null;
        for (const citation of citations) {
          const cPages = citationPages(citation);
          if (firstPage === null && cPages.length) firstPage = cPages[0];
          for (const {page: n, box} of citationBoxes(citation)) {
            const page = pages.get(n);
            if (!page) continue;
            const el = h('div', {class: `cite-box ${citation.verified ? 'verified' : 'unverified'}`,
              title: `${field.name}: ${valueText(value.value)}`, dataset: {valueId}});
            el.addEventListener('click', () => select(valueId, n));
            page.overlay.append(el);
            page.boxes.push({el, box});
            if (page.size) place(el, box, page.size);
            boxEls.push(el);
          }
        }
        boxesByValue.set(valueId, boxEls);
        const confidence = typeof value.confidence === 'number'
          ? badge(`confidence ${Math.round(value.confidence * 100)}%`, 'confidence') : null;
        const citeLinks = citations.map((citation) => {
          const cPages = citationPages(citation);
          const label = cPages.length > 1 ? `pp. ${cPages[0]}–${cPages[cPages.length - 1]}` : `p. ${cPages[0] ?? '?'}`;
          return h('li', {class: 'citation'},
            h('button', {type: 'button', class: 'link', onclick: () => select(valueId, cPages[0])}, label), ' ',
            h('q', null, citation.quote || ''), citation.verified ? null : badge('not found', 'unverified'),
            citation.source === 'ocr' ? badge('OCR', 'confidence') : null);
        });
        list.append(h('li', {class: 'value', dataset: {valueId}},
          h('button', {type: 'button', class: 'value-text', 'aria-label': `Show ${field.name} on the page`,
            onclick: () => { if (firstPage !== null) select(valueId, firstPage); }}, valueText(value.value)),
          ' ', value.verified ? badge('verified', 'verified') : badge('unverified', 'unverified'), ' ', confidence,
          citeLinks.length ? h('ul', {class: 'citations'}, citeLinks) : null));
      }
      fieldList.append(h('section', {class: 'field'}, h('h3', null, field.name || field.key),
        values.length ? list : h('p', {class: 'muted'}, 'not found')));
    }

    const exportError = h('span', {class: 'error', role: 'alert'});
    const report = (err) => { exportError.textContent = err.message; };
    const exportBar = h('div', {class: 'exports'}, exportError,
      h('button', {type: 'button', id: 'export-json', onclick: () => {
        const blob = new Blob([JSON.stringify(result, null, 2)], {type: 'application/json'});
        saveUrl(URL.createObjectURL(blob), `${task.id}.json`);
      }}, 'Export JSON'),
      result.artifacts && result.artifacts.annotated_pdf ? h('button', {type: 'button', id: 'export-pdf',
        onclick: () => download(`${taskPath}/artifacts/annotated_pdf`, result.artifacts.annotated_pdf.filename).catch(report)},
      'Annotated PDF') : null,
      result.artifacts && result.artifacts.summary_md ? h('button', {type: 'button', id: 'export-md',
        onclick: () => download(`${taskPath}/artifacts/summary_md`, result.artifacts.summary_md.filename).catch(report)},
      'Markdown') : null);

    const sessionId = result.session_id || done.session_id;
    const chat = sessionId ? followUpChat(sessionId, signal) : null;
    replace(element,
      h('div', {class: 'toolbar'}, h('h2', null, result.title || 'Contract review'), h('span', {class: 'spacer'}),
        exportBar),
      (result.warnings || []).map((w) => h('p', {class: 'warning'}, w)),
      h('div', {class: 'review-grid'}, pageColumn, h('div', {class: 'side'}, fieldList, chat)));
  }

  return {element, onTask};
}

function followUpChat(sessionId, signal) {
  const log = h('div', {class: 'chat-log', id: 'followup-log', 'aria-live': 'polite'});
  const input = h('input', {id: 'followup', type: 'text', required: true, autocomplete: 'off'});
  const button = h('button', {type: 'submit'}, 'Ask');
  const form = h('form', {class: 'followup', onsubmit: async (event) => {
    event.preventDefault();
    const question = input.value.trim();
    if (!question) return;
    input.value = '';
    button.disabled = true;
    log.append(h('p', {class: 'msg user'}, question));
    const answer = h('p', {class: 'msg assistant'});
    log.append(answer);
    try {
      await streamChat({messages: [{role: 'user', content: question}], session_id: sessionId, max_tokens: 256},
        {signal, onDelta: (d) => { answer.textContent += d.content; }});
    } catch (err) {
      answer.append(h('span', {class: 'error'}, ` ${err.message}`));
    } finally { button.disabled = false; }
  }}, h('label', {for: 'followup'}, 'Ask about this contract'), h('div', {class: 'row'}, input, button));
  return h('section', {class: 'card'}, h('h3', null, 'Follow-up'), log, form);
}
