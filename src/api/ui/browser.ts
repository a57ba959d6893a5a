/**
 * The few browser APIs the dashboard uses, typed here. The project is compiled in one
 * program with Node's types only: TypeScript's DOM library would apply to the server's
 * code too (it changes what `new Response(buffer)` and timers accept), so the page's
 * modules reach the browser through this one typed view of the global object instead.
 */

export interface DomEvent { preventDefault(): void; readonly target: unknown }

export interface Elem {
  id: string;
  hidden: boolean;
  textContent: string | null;
  className: string;
  readonly classList: { toggle(name: string, on?: boolean): boolean };
  setAttribute(name: string, value: string): void;
  getAttribute(name: string): string | null;
  addEventListener(type: string, listener: (e: DomEvent) => void): void;
  append(...nodes: (Elem | string)[]): void;
  replaceChildren(...nodes: (Elem | string)[]): void;
  querySelector(selector: string): Elem | null;
  querySelectorAll(selector: string): ArrayLike<Elem>;
  focus(): void;
}

/** input, select and textarea. */
export interface Field extends Elem { value: string; checked: boolean; name: string }

export interface Browser {
  document: { createElement(tag: string): Elem; getElementById(id: string): Elem | null; readonly readyState: string; addEventListener(type: string, listener: () => void): void };
  sessionStorage: { getItem(key: string): string | null; setItem(key: string, value: string): void; removeItem(key: string): void };
  location: { readonly origin: string };
  /** getRandomValues, unlike randomUUID, is there on a page served over plain HTTP too. */
  crypto: { getRandomValues<T extends Uint8Array>(array: T): T };
  confirm(message: string): boolean;
  addEventListener(type: string, listener: () => void): void;
  dispatchEvent(event: Event): boolean;
}

/** The global object, as the browser has it (see above for why it is not the DOM library). */
export const browser = globalThis as unknown as Browser;
