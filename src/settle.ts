/**
 * Waits for every promise, then throws the first rejection (in the order given). For
 * parallel reads into, or writes from, one buffer: Promise.all rejects at the first
 * failure while the others still use the buffer, and a caller that then gives the
 * buffer back (a pool slot) would let them change, or send, another chunk's bytes.
 */
export async function settleAll(promises: Iterable<Promise<unknown>>): Promise<void> {
  const settled = await Promise.allSettled(promises);
  const failed = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
  if (failed) throw failed.reason;
}
