/**
 * The most bytes a valid repository object of each kind can have, as stored: what a
 * read asks of storage (`get(name, { maxBytes })`), so that a stray, damaged or hostile
 * file at an object's name (a sparse file of terabytes in `locks/`, a copy of a disk
 * image in `backups/`) is refused before it is read into memory, as a damaged object
 * (IntegrityError), instead of taking the host's memory or stopping every command.
 * Each bound is what this format can produce, with room to spare: a valid object is
 * never refused. Chunks have theirs in chunk.ts (sealedChunkBound), index objects in
 * chunk-index.ts (INDEX_OBJECT_MAX_BYTES).
 */

const MiB = 1024 * 1024;

/**
 * The config, key files, locks, quarantine entries and drill records: a few hundred
 * bytes of JSON each (a key file's KDF parameters and sealed secret, a lock's holder and
 * expiry, a drill's probe and reason). 1 MiB is thousands of times what any of them needs.
 */
export const SMALL_OBJECT_MAX_BYTES = 1 * MiB;

/**
 * A backup manifest, and a verification record (a list of damaged chunk ids per disk,
 * at most the manifest's own: repo/health.ts). Both are JSON.stringify of one object
 * (zstd-compressed for a manifest, stored as is for a record), so their JSON is one
 * JavaScript string: V8 refuses strings longer than 2^29 - 24 characters (Node's
 * buffer.constants.MAX_STRING_LENGTH), about 512 MiB of ASCII, and zstd never makes
 * its input larger but by a few bytes per 128 KiB block. No vmvault can write (or read
 * back) a larger one. For scale: a 20 TiB disk in 4 MiB chunks is 5,242,880 chunk ids,
 * 351 MB of manifest JSON (67 bytes an id), 185 MB once compressed (35 bytes an id);
 * the string limit caps a manifest at about 8 million ids, about 32 TiB of disks with
 * data at 4 MiB a chunk, and about 270 MiB compressed. 513 MiB: the string limit plus
 * a margin for the compression frame and the seal.
 */
export const MANIFEST_MAX_BYTES = 513 * MiB;

/** A verification record lists at most the chunk ids of its backup's manifest: the same bound. */
export const VERIFICATION_RECORD_MAX_BYTES = MANIFEST_MAX_BYTES;

/**
 * Stored bytes of manifests read at once (Repository.loadManifest; callers run 16 reads
 * together): each manifest is bounded above, and this bounds their sum, so a repository
 * with several huge objects under backups/ costs one of them at a time, not sixteen.
 * Real manifests are kilobytes to a few hundred MiB (a 20 TiB disk): one such is read
 * alone, and the many small ones of an ordinary repository never wait.
 */
export const MANIFEST_READ_BUDGET = 128 * MiB;

/** Stored bytes of verification records read at once (repo/health.ts readRecords): as for manifests. */
export const RECORD_READ_BUDGET = MANIFEST_READ_BUDGET;
