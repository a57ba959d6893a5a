/**
 * Reading policy files: YAML → zod, with every problem reported as
 * `FILE:LINE:COL: key.path: message` (all of them, not just the first), so an
 * operator can fix a file in one go and an editor can jump to each line.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Document, LineCounter, Node } from 'yaml';
import { lazy } from '../lazy-require.js';
import type * as z from 'zod';
import { VmvaultError } from '../errors.js';
import { POLICY_KEYS, policySchema, type Policy } from './schema.js';

const yaml = lazy<typeof import('yaml')>('yaml');

/** One problem in one file; `line` and `col` are 1-based. */
export interface PolicyProblem { file: string; line: number; col: number; path: string; message: string }

export const formatProblem = (p: PolicyProblem): string => `${p.file}:${p.line}:${p.col}: ${p.path}: ${p.message}`;

/** A policy file that cannot be used; `problems` lists every error, the message prints them one per line. */
export class PolicyFileError extends VmvaultError {
  readonly problems: PolicyProblem[];
  constructor(problems: PolicyProblem[]) {
    super('BAD_INPUT', problems.map(formatProblem).join('\n'));
    this.name = 'PolicyFileError';
    this.problems = problems;
  }
}

export interface LoadedPolicy { file: string; policy: Policy }

/**
 * How problems in one kind of YAML file (a policy, the service configuration) are
 * worded: the name of the whole document, what an empty file lacks, and every key the
 * file may use at any level (to suggest a fix for a typo).
 */
export interface YamlFileKind { root: string; empty: string; keys: readonly string[] }

const POLICY_FILE: YamlFileKind = { root: '(policy)', empty: 'the file is empty: expected name, schedule, select and retention', keys: POLICY_KEYS };

/** `select.vms[1]`, `retention.byLabel.pre-update.keepWithin`; the document itself is `root`. */
export function formatPath(path: readonly PropertyKey[], root: string): string {
  let s = '';
  for (const k of path) s += typeof k === 'number' ? `[${k}]` : `${s ? '.' : ''}${String(k)}`;
  return s || root;
}

const keyOf = (node: unknown): string => (yaml().isScalar(node) ? String(node.value) : String(node));

/** The node at `path` (or the nearest ancestor that exists), and the pair's key node when the last step is a map key. */
function locate(doc: Document, path: readonly PropertyKey[]): { node: Node | null; key: Node | null; found: boolean } {
  let node = doc.contents as Node | null;
  let key: Node | null = null;
  for (const step of path) {
    if (yaml().isAlias(node)) node = (node.resolve(doc) as Node | undefined) ?? node; // point into the anchored value
    if (yaml().isMap(node)) {
      const pair = node.items.find((p) => yaml().isPair(p) && keyOf(p.key) === String(step));
      if (!pair) return { node, key: null, found: false };
      key = pair.key as Node;
      node = (pair.value as Node | null) ?? key;
    } else if (yaml().isSeq(node) && typeof step === 'number' && node.items[step]) {
      node = node.items[step] as Node;
      key = null;
    } else {
      return { node, key: null, found: false };
    }
  }
  return { node, key, found: true };
}

/** Edit distance with transpositions (optimal string alignment), for near misses such as polciesDir. */
function distance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let v = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) v = Math.min(v, d[i - 2]![j - 2]! + 1);
      d[i]![j] = v;
    }
  }
  return d[a.length]![b.length]!;
}

/** The closest known key: same letters ignoring case and `-_ `, else at most one edit per four characters. */
function suggestion(unknown: string, keys: readonly string[]): string {
  const norm = (k: string) => k.toLowerCase().replace(/[-_ ]/g, '');
  let best: { key: string; d: number } | undefined;
  for (const key of keys) {
    const d = distance(norm(key), norm(unknown));
    if (d <= Math.max(1, Math.floor(key.length / 4)) && (!best || d < best.d)) best = { key, d };
  }
  return best ? ` (did you mean "${best.key}"?)` : '';
}

/** A rule across keys, checked beside the schema; `path` is where the problem is shown. */
export interface YamlIssue { path: readonly PropertyKey[]; message: string }

/** Every zod issue as problems pointing into the YAML (one per unknown key). */
function problemsOf(file: string, doc: Document, lines: LineCounter, issues: readonly (z.core.$ZodIssue | YamlIssue)[], kind: YamlFileKind): PolicyProblem[] {
  const at = (offset: number | undefined, path: readonly PropertyKey[], message: string): PolicyProblem => {
    const { line, col } = lines.linePos(offset ?? 0);
    return { file, line, col, path: formatPath(path, kind.root), message };
  };
  const out: PolicyProblem[] = [];
  for (const issue of issues) {
    const where = locate(doc, issue.path);
    const code = 'code' in issue ? issue.code : undefined;
    if (code === 'unrecognized_keys' && 'keys' in issue) {
      for (const k of issue.keys) {
        const key = locate(doc, [...issue.path, k]).key;
        out.push(at(key?.range?.[0] ?? where.node?.range?.[0], [...issue.path, k], `unknown key${suggestion(k, kind.keys)}`));
      }
    } else if (!where.found && code !== undefined) { // a YamlIssue says itself what is missing
      const missing = String(issue.path[issue.path.length - 1]);
      out.push(at(where.node?.range?.[0], issue.path, `missing: "${missing}" is required`));
    } else if (code === 'invalid_key' && 'issues' in issue) {
      out.push(at(where.key?.range?.[0] ?? where.node?.range?.[0], issue.path, issue.issues[0]?.message ?? issue.message));
    } else {
      out.push(at(where.node?.range?.[0], issue.path, issue.message));
    }
  }
  return out.sort((a, b) => a.line - b.line || a.col - b.col);
}

/** Where a key path points in a YAML file, 1-based (given to `check` to name another occurrence). */
export type YamlPosition = (path: readonly PropertyKey[]) => { line: number; col: number };

const positionIn = (doc: Document, lines: LineCounter): YamlPosition => (path) => lines.linePos(locate(doc, path).node?.range?.[0] ?? 0);

/**
 * Aliases a document may expand (the yaml package counts each alias by the size of
 * what it copies): plenty for a policy or configuration that reuses a list or two,
 * and a refusal for a few hundred bytes that would expand to millions of nodes.
 */
const MAX_ALIAS_COUNT = 100;

const TOO_MANY_ALIASES = `refused: its aliases (*name) expand to more than ${MAX_ALIAS_COUNT} copies of anchored values, `
  + 'the shape of a "billion laughs" document; write the values out, or use fewer aliases';

/** Where the first alias of the document is, 1-based (1:1 when there is none). */
function firstAlias(doc: Document, lines: LineCounter): { line: number; col: number } {
  let offset = 0;
  yaml().visit(doc, { Alias: (_key, node) => { offset = node.range?.[0] ?? 0; return yaml().visit.BREAK; } });
  return lines.linePos(offset);
}

/**
 * Parses YAML text and validates it with `schema` and with `check` (rules across
 * keys; it gets the raw value, whatever its shape, and runs even when the schema
 * fails, so every problem is reported at once). `file` is only used in messages.
 * `refused` marks a text not even read as data (aliases that expand too far): a
 * request to check it is a bad request, not a policy with problems.
 */
export function validateYaml<T>(
  text: string, file: string, schema: z.ZodType<T>, kind: YamlFileKind,
  check?: (raw: unknown, position: YamlPosition) => YamlIssue[],
): { ok: true; value: T } | { ok: false; problems: PolicyProblem[]; refused?: true } {
  const lines = new (yaml().LineCounter)();
  const doc = yaml().parseDocument(text, { lineCounter: lines, prettyErrors: false });
  if (doc.errors.length > 0) {
    return { ok: false, problems: doc.errors.map((e) => {
      const { line, col } = lines.linePos(e.pos[0]);
      return { file, line, col, path: 'YAML', message: e.message.split('\n')[0]! };
    }) };
  }
  if (doc.contents === null) return { ok: false, problems: [{ file, line: 1, col: 1, path: kind.root, message: kind.empty }] };
  let raw: unknown;
  try {
    raw = doc.toJS({ maxAliasCount: MAX_ALIAS_COUNT });
  } catch (err) {
    // The yaml package's guard against exponential expansion ("billion laughs") throws a
    // ReferenceError; anything else it throws is ours to see.
    if (!(err instanceof ReferenceError) || !/alias/i.test(err.message)) throw err;
    return { ok: false, refused: true, problems: [{ file, ...firstAlias(doc, lines), path: 'YAML', message: TOO_MANY_ALIASES }] };
  }
  const result = schema.safeParse(raw);
  const extra = check?.(raw, positionIn(doc, lines)) ?? [];
  if (result.success && extra.length === 0) return { ok: true, value: result.data };
  return { ok: false, problems: problemsOf(file, doc, lines, [...(result.error?.issues ?? []), ...extra], kind) };
}

/** Validates one policy file's text, returning the policy or every problem (with its line). */
export function checkPolicyText(text: string, file: string): ReturnType<typeof validateYaml<Policy>> {
  return validateYaml(text, file, policySchema, POLICY_FILE);
}

/**
 * Parses and validates one policy file's text. `file` is only used in messages.
 * Throws PolicyFileError (BAD_INPUT) listing every problem.
 */
export function parsePolicy(text: string, file: string): Policy {
  const result = checkPolicyText(text, file);
  if (!result.ok) throw new PolicyFileError(result.problems);
  return result.value;
}

async function readPolicyText(file: string): Promise<string> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    throw new VmvaultError('BAD_INPUT', `${file}: cannot read policy file: ${(err as Error).message}`, { cause: err });
  }
}

/** Reads and validates one policy file. Throws PolicyFileError, or BAD_INPUT when it cannot be read. */
export async function loadPolicyFile(file: string): Promise<Policy> {
  return parsePolicy(await readPolicyText(file), file);
}

/** Where the value at `path` starts in a (valid) YAML text, 1-based. */
function positionOf(text: string, path: readonly PropertyKey[]): { line: number; col: number } {
  const lines = new (yaml().LineCounter)();
  return positionIn(yaml().parseDocument(text, { lineCounter: lines }), lines)(path);
}

/**
 * Every `*.yaml` / `*.yml` policy in `dir`, sorted by file name. A bad file does not
 * stop the others: its problems are returned beside the good policies (so a service
 * goes on with the valid ones). A policy name used by an earlier file is a problem.
 */
export async function loadPolicies(dir: string): Promise<{ policies: LoadedPolicy[]; problems: PolicyProblem[] }> {
  const names = (await readdir(dir)).filter((n) => /\.ya?ml$/.test(n)).sort();
  const policies: LoadedPolicy[] = [];
  const problems: PolicyProblem[] = [];
  const byName = new Map<string, string>();
  for (const n of names) {
    const file = join(dir, n);
    try {
      const text = await readPolicyText(file);
      const policy = parsePolicy(text, file);
      const first = byName.get(policy.name);
      if (first) {
        problems.push({ file, ...positionOf(text, ['name']), path: 'name', message: `policy "${policy.name}" is already defined in ${first}` });
        continue;
      }
      byName.set(policy.name, file);
      policies.push({ file, policy });
    } catch (err) {
      if (err instanceof PolicyFileError) problems.push(...err.problems);
      else if (err instanceof VmvaultError) problems.push({ file, line: 1, col: 1, path: '(file)', message: err.message });
      else throw err;
    }
  }
  return { policies, problems };
}
