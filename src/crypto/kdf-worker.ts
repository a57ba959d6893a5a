/** Worker thread for Argon2id: its 64+ MiB of WebAssembly memory goes away with the thread. */
import { parentPort, workerData } from 'node:worker_threads';
import { sodium } from './sodium.js';

const { passphrase, salt, opsLimit, memLimit } = workerData as { passphrase: string; salt: Uint8Array; opsLimit: number; memLimit: number };
const key = sodium.crypto_pwhash(32, passphrase, salt, opsLimit, memLimit, sodium.crypto_pwhash_ALG_ARGON2ID13);
parentPort!.postMessage(key);
