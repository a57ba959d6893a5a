/**
 * `GET /metrics`: Prometheus metrics (src/ops/metrics.ts). It takes a bearer token
 * with the viewer role, like every other reading route: give Prometheus a token of
 * its own (`api.tokens: [{ name: prometheus, role: viewer, sha256: … }]`) and set it
 * as the scrape job's `authorization: { credentials_file: … }`. Not in the OpenAPI
 * document: it is text in Prometheus' exposition format, not JSON.
 */
import type { OpenAPIHono } from '@hono/zod-openapi';
import { Metrics } from '../../ops/metrics.js';
import type { StatusSources } from '../../ops/status.js';
import { needsRole, type ApiEnv } from './access.js';

export function registerMetricsRoute(app: OpenAPIHono<ApiEnv>, sources: StatusSources): void {
  const metrics = new Metrics(sources);
  app.get('/metrics', needsRole('viewer'), async (c) => {
    const { contentType, text } = await metrics.render();
    return c.body(text, 200, { 'Content-Type': contentType, 'Cache-Control': 'no-store' });
  });
}
