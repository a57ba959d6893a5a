/**
 * A strict parser of Prometheus' text exposition format (version 0.0.4), for tests:
 * every line must be a HELP, a TYPE or a sample of a declared metric, with valid names,
 * quoted and escaped label values and a float value; anything else throws, naming the line.
 */
export interface Sample { name: string; labels: Record<string, string>; value: number }
export interface Family { name: string; help: string; type: string; samples: Sample[] }

const NAME = '[a-zA-Z_:][a-zA-Z0-9_:]*';
const LABEL = '[a-zA-Z_][a-zA-Z0-9_]*';
const VALUE = /^(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN)$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

function parseLabels(text: string, at: string): Record<string, string> {
  const out: Record<string, string> = {};
  const re = new RegExp(`^(${LABEL})="((?:[^"\\\\\\n]|\\\\[\\\\"n])*)"(,|$)`);
  let rest = text;
  while (rest.length) {
    const m = re.exec(rest);
    if (!m) throw new Error(`${at}: malformed labels {${text}}`);
    if (m[1]! in out) throw new Error(`${at}: label ${m[1]} repeated`);
    out[m[1]!] = m[2]!.replace(/\\(.)/g, (_, c: string) => (c === 'n' ? '\n' : c));
    rest = rest.slice(m[0].length);
  }
  return out;
}

export function parsePrometheusText(text: string): Map<string, Family> {
  const families = new Map<string, Family>();
  if (!text.endsWith('\n')) throw new Error('the exposition must end with a newline');
  const lines = text.slice(0, -1).split('\n');
  lines.forEach((line, i) => {
    const at = `line ${i + 1} "${line}"`;
    if (line === '') return;
    let m = new RegExp(`^# (HELP|TYPE) (${NAME}) (.*)$`).exec(line);
    if (m) {
      const f = families.get(m[2]!) ?? { name: m[2]!, help: '', type: '', samples: [] };
      if (f.samples.length) throw new Error(`${at}: ${m[1]} after samples of ${m[2]}`);
      if (m[1] === 'TYPE') {
        if (f.type) throw new Error(`${at}: second TYPE`);
        if (!TYPES.has(m[3]!)) throw new Error(`${at}: unknown type`);
        f.type = m[3]!;
      } else {
        if (f.help) throw new Error(`${at}: second HELP`);
        f.help = m[3]!;
      }
      families.set(f.name, f);
      return;
    }
    if (line.startsWith('#')) return; // Other comments are allowed.
    m = new RegExp(`^(${NAME})(?:\\{(.*)\\})? (\\S+)(?: (-?\\d+))?$`).exec(line);
    if (!m) throw new Error(`${at}: not a sample`);
    if (!VALUE.test(m[3]!)) throw new Error(`${at}: value "${m[3]}" is not a float`);
    const base = families.get(m[1]!) ?? families.get(m[1]!.replace(/_(bucket|sum|count)$/, ''));
    if (!base || !base.type) throw new Error(`${at}: sample of ${m[1]} without a TYPE`);
    const labels = m[2] ? parseLabels(m[2], at) : {};
    const key = JSON.stringify([m[1], Object.entries(labels).sort()]);
    if (base.samples.some((s) => JSON.stringify([s.name, Object.entries(s.labels).sort()]) === key)) throw new Error(`${at}: duplicate sample`);
    base.samples.push({ name: m[1]!, labels, value: Number(m[3]!.replace(/^\+?Inf$/, 'Infinity').replace(/^-Inf$/, '-Infinity')) });
  });
  return families;
}

/** The value of the one sample of `name` whose labels include `labels`; undefined when none. */
export function sampleValue(families: Map<string, Family>, name: string, labels: Record<string, string> = {}): number | undefined {
  const found = families.get(name)?.samples.filter((s) => Object.entries(labels).every(([k, v]) => s.labels[k] === v)) ?? [];
  if (found.length > 1) throw new Error(`${found.length} samples of ${name} match ${JSON.stringify(labels)}`);
  return found[0]?.value;
}
