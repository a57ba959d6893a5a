/**
 * While Redis is down, the queues vmvault holds stay quiet: their connection's owner
 * reports the outage in the service's log, and BullMQ would otherwise print a raw stack
 * trace on stderr for every reconnection attempt of every queue.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { createConnection } from '../../src/queue/connection.js';
import { hostQueue, maintenanceQueue } from '../../src/queue/enqueue.js';
import { startRedis } from '../helpers/redis.js';

test('queues print nothing on stderr while Redis is down, and work again once it is back', async () => {
  const redis = await startRedis();
  const connection = createConnection(redis.url, 'producer');
  const ownerSaw: string[] = [];
  connection.on('error', (err: Error) => ownerSaw.push(err.message));
  const queues = [hostQueue(connection, 'hosta'), maintenanceQueue(connection)];
  const printed: unknown[] = [];
  const consoleError = console.error;
  console.error = (...args: unknown[]) => void printed.push(args);
  try {
    await queues[0]!.add('probe', {});
    await redis.stop();
    await sleep(1500);
    assert.ok(ownerSaw.length > 0, 'the connection reported the outage to its owner');
    assert.deepEqual(printed, [], 'nothing was printed by the queues');
  } finally {
    console.error = consoleError;
    await Promise.all(queues.map((q) => q.close().catch(() => {})));
    connection.disconnect();
  }
});
