// Video: the timeline of observations with their times, the answer with its time citations; clicking a time
// seeks the uploaded video and outlines the nearest frame of the contact sheet.
import {objectUrl} from './api.js';
import {badge, h, pct, replace} from './dom.js';

export function videoView(task, signal) {
  const element = h('section', {class: 'video', 'aria-label': 'Video analysis'});
  const blob = (task.input || {}).blob;

  function onTask(done) {
    const result = done.result;
    if (!result || done.status !== 'succeeded') return;
    const player = h('video', {controls: true, id: 'player', preload: 'metadata'});
    const sheet = h('img', {id: 'contact-sheet', alt: 'Contact sheet of key frames'});
    const now = h('p', {class: 'muted', role: 'status'});
    if (blob) objectUrl(`/v1/files/${blob}`).then((url) => { player.src = url; }).catch(() => { player.remove(); });
    const sheetInfo = result.artifacts && result.artifacts.contact_sheet;
    if (sheetInfo) {
      objectUrl(`/v1/tasks/${encodeURIComponent(task.id)}/artifacts/contact_sheet`)
        .then((url) => { sheet.src = url; }).catch(() => {});
    }
    const cells = (sheetInfo && Array.isArray(sheetInfo.frames)) ? sheetInfo.frames : [];
    const marker = h('div', {class: 'frame-marker', id: 'frame-marker', hidden: true});
    const sheetBox = h('div', {class: 'sheet-box'}, sheet, marker);
    /** Outline the contact-sheet frame nearest `seconds` (its box is in sheet pixels). */
    const markFrame = (seconds) => {
      if (!cells.length || !sheet.naturalWidth) return null;
      const cell = cells.reduce((best, c) => (Math.abs(c.t - seconds) < Math.abs(best.t - seconds) ? c : best));
      const [x0, y0, x1, y1] = cell.box;
      marker.style.left = pct(x0, sheet.naturalWidth);
      marker.style.top = pct(y0, sheet.naturalHeight);
      marker.style.width = pct(x1 - x0, sheet.naturalWidth);
      marker.style.height = pct(y1 - y0, sheet.naturalHeight);
      marker.dataset.t = String(cell.t);
      marker.hidden = false;
      return cell;
    };
    const seek = (seconds, label) => {
      now.textContent = `at ${label}`;
      const cell = markFrame(seconds);
      if (blob && player.isConnected) {
        player.currentTime = seconds;
        player.scrollIntoView({block: 'nearest'});
      } else if (cell) {
        marker.scrollIntoView({block: 'nearest'});
      }
    };
    const timeButton = (seconds, label) => h('button', {type: 'button', class: 'link time', onclick: () => seek(seconds, label)}, label);
    const timeline = h('ol', {class: 'timeline', id: 'timeline'}, (result.timeline || []).map((o) => h('li', null,
      timeButton(o.start, `${o.start_ts}–${o.end_ts}`), ' ', String(o.description ?? ''))));
    const citations = (result.citations || []).map((c) => h('li', null, timeButton(c.time, c.ts), ' ',
      String(c.claim ?? ''), ' ', badge(c.supported ? 'supported' : 'unsupported', c.supported ? 'verified' : 'unverified')));
    replace(element,
      result.answer ? h('div', {class: 'card'}, h('h2', null, 'Answer'), h('p', {id: 'answer'}, String(result.answer)),
        citations.length ? h('ul', null, citations) : null) : null,
      h('div', {class: 'columns'},
        h('div', {class: 'card'}, h('h2', null, 'Timeline'), timeline),
        h('div', {class: 'card'}, blob ? player : null, now, sheetInfo ? sheetBox : null)));
  }

  return {element, onTask};
}
