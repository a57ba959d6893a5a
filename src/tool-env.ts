/**
 * The environment of the external programs vmvault runs (qemu-img, qemu-nbd,
 * qemu-system-x86_64, setpriv, virsh, redis-server): vmvault's own, without its
 * secrets. A child inherits the whole environment by default, and keeps it for its
 * life in /proc/PID/environ: a drill's QEMU runs an untrusted guest, and an instant
 * restore's QEMU runs on after vmvault has exited. None of these programs needs the
 * repository passphrase, S3 keys, the Redis or SMTP password or a webhook secret.
 *
 * Dropped: VMVAULT_* and AWS_*, any name that reads like a secret (PASSWORD, PASSWD,
 * PASSPHRASE, a PASS part, SECRET, TOKEN, CREDENTIAL, PRIVATE, a _KEY part), any value that is a
 * URL with a password in it, and the names the configuration says hold a secret
 * (`hideFromTools`). Kept: the rest, such as PATH, HOME, LANG/LC_*, TMPDIR,
 * XDG_RUNTIME_DIR, LIBVIRT_DEFAULT_URI, SSH_AUTH_SOCK.
 */

const OWN_PREFIXES = /^(?:VMVAULT|AWS)_/i;
const SECRET_NAME = /PASSWORD|PASSWD|PASSPHRASE|PASS(?:_|$)|SECRET|TOKEN|CREDENTIAL|PRIVATE|APIKEY|_KEY(?:_|$)/i;
/** scheme://user:password@host… (a Redis or database URL with its password). */
const URL_WITH_PASSWORD = /^[a-z][a-z0-9+.-]*:\/\/[^/@\s]*:[^/@\s]*@/i;

const hidden = new Set<string>();

/**
 * Names of environment variables that hold a secret whatever they are called
 * (a configuration's passwordEnv, secretEnv): kept from every external program from
 * now on, in this process.
 */
export function hideFromTools(names: Iterable<string | undefined>): void {
  for (const n of names) if (n) hidden.add(n);
}

/** Whether `name=value` stays out of an external program's environment. */
export function isSecretEnv(name: string, value: string | undefined): boolean {
  return OWN_PREFIXES.test(name) || SECRET_NAME.test(name) || hidden.has(name) || (value !== undefined && URL_WITH_PASSWORD.test(value));
}

/**
 * The environment for an external program: `from` (default: this process's) without
 * its secrets. Give it as the whole environment (execa: `env` with `extendEnv: false`;
 * spawn: `env`), never merged with process.env.
 */
export function toolEnv(from: NodeJS.ProcessEnv = process.env): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [name, value] of Object.entries(from)) {
    if (value !== undefined && !isSecretEnv(name, value)) env[name] = value;
  }
  return env;
}
