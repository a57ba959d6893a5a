/**
 * Building DOM nodes without innerHTML: every string becomes a text node, so names and
 * messages from the API can never become markup.
 */
import { browser, type Elem, type Field } from './browser.js';

export type Child = Elem | string | number | null | undefined | false;
type Attrs = Record<string, string | boolean | undefined | (() => void)>;

export function h(tag: string, attrs: Attrs = {}, ...children: Child[]): Elem {
  const el = browser.document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === false) continue;
    if (typeof v === 'function') el.addEventListener(k.replace(/^on/, ''), v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  el.append(...nodes(children));
  return el;
}

function nodes(children: Child[]): (Elem | string)[] {
  return children.filter((c): c is Elem | string | number => c !== null && c !== undefined && c !== false).map((c) => (typeof c === 'number' ? String(c) : c));
}

/** A table with a header row, or `empty` when there are no rows. */
export function table(headers: string[], rows: Elem[], empty: string): Elem {
  if (rows.length === 0) return h('p', { class: 'hint' }, empty);
  return h('table', {}, h('thead', {}, h('tr', {}, ...headers.map((t) => h('th', {}, t)))), h('tbody', {}, ...rows));
}

export function byId(id: string): Elem {
  const el = browser.document.getElementById(id);
  if (!el) throw new Error(`the page has no #${id}`);
  return el;
}

/** The field named `name` of `form`. */
export function field(form: Elem, name: string): Field {
  const el = form.querySelector(`[name="${name}"]`);
  if (!el) throw new Error(`the form has no field "${name}"`);
  return el as Field;
}

/** Replaces the content of section `sectionId`'s .body. */
export function fill(sectionId: string, ...content: Child[]): void {
  byId(sectionId).querySelector('.body')?.replaceChildren(...nodes(content));
}

/** Sets the text of every `selector` inside `sectionId`. */
export function setText(sectionId: string, selector: string, text: string): void {
  const all = byId(sectionId).querySelectorAll(selector);
  for (let i = 0; i < all.length; i++) all[i]!.textContent = text;
}
