import assert from 'node:assert/strict';
import path from 'node:path';
import { describe, test } from 'node:test';
import { VmvaultError } from '../../src/errors.js';
import { maskCredentials, openStorage, parseRepositoryUrl, type RepositoryLocation } from '../../src/storage/open.js';

const s3 = (bucket: string, more: Partial<Extract<RepositoryLocation, { kind: 's3' }>> = {}): RepositoryLocation => ({
  kind: 's3', bucket, prefix: '', region: undefined, endpoint: undefined, forcePathStyle: false, ...more,
});

describe('parseRepositoryUrl', () => {
  const accepted: Array<[string, RepositoryLocation]> = [
    ['/srv/backups', { kind: 'local', path: '/srv/backups' }],
    ['/srv/backups/', { kind: 'local', path: '/srv/backups/' }],
    ['./repo', { kind: 'local', path: './repo' }],
    ['../repo', { kind: 'local', path: '../repo' }],
    ['rel/path', { kind: 'local', path: 'rel/path' }],
    ['repo', { kind: 'local', path: 'repo' }],
    ['./my:repo', { kind: 'local', path: './my:repo' }],
    ['file:///srv/backups', { kind: 'local', path: '/srv/backups' }],
    ['file:///srv/with%20space', { kind: 'local', path: '/srv/with space' }],
    ['s3://bucket', s3('bucket')],
    ['s3://bucket/', s3('bucket')],
    ['s3://my.bucket-1/vm/prod', s3('my.bucket-1', { prefix: 'vm/prod' })],
    ['s3://bucket/vm/prod/', s3('bucket', { prefix: 'vm/prod' })],
    ['S3://bucket/p', s3('bucket', { prefix: 'p' })],
    ['s3://bucket/p?region=eu-west-3', s3('bucket', { prefix: 'p', region: 'eu-west-3' })],
    ['s3://bucket/p?endpoint=http://127.0.0.1:9000', s3('bucket', { prefix: 'p', endpoint: 'http://127.0.0.1:9000', forcePathStyle: true })],
    ['s3://bucket?endpoint=https://minio.example.com/', s3('bucket', { endpoint: 'https://minio.example.com', forcePathStyle: true })],
    ['s3://bucket?endpoint=http%3A%2F%2F10.0.0.1%3A9000', s3('bucket', { endpoint: 'http://10.0.0.1:9000', forcePathStyle: true })],
    ['s3://bucket?endpoint=https://r2.example.com&path-style=false&region=auto', s3('bucket', { endpoint: 'https://r2.example.com', forcePathStyle: false, region: 'auto' })],
    ['s3://bucket?path-style=true', s3('bucket', { forcePathStyle: true })],
  ];
  for (const [url, expected] of accepted) {
    test(`accepts ${url}`, () => assert.deepEqual(parseRepositoryUrl(url), expected));
  }

  const rejected: Array<[string, RegExp]> = [
    ['', /empty/],
    ['   ', /empty/],
    ['s4://x', /unknown scheme "s4:"/],
    ['http://bucket', /unknown scheme "http:"/],
    ['my:repo', /unknown scheme "my:".*\.\/my:repo/],
    ['constructor://x', /unknown scheme "constructor:"/],
    ['toString:x', /unknown scheme "toString:"/],
    ['s3:/bucket', /must start with "s3:\/\/" \(did you mean "s3:\/\/bucket"\?\)/],
    ['s3:bucket/p', /did you mean "s3:\/\/bucket\/p"/],
    ['s3://', /bucket name is missing/],
    ['s3:///p', /bucket name is missing/],
    ['s3://?endpoint=http://x', /bucket name is missing/],
    ['s3://Bucket', /"Bucket" is not a valid bucket name/],
    ['s3://b', /not a valid bucket name/],
    ['s3://a..b', /not a valid bucket name/],
    ['s3://bucket_x', /not a valid bucket name/],
    ['s3://bucket//p', /invalid prefix/],
    ['s3://bucket/a//b', /invalid prefix/],
    ['s3://bucket/a/../b', /invalid prefix/],
    ['s3://bucket/a\\b', /invalid prefix/],
    ['s3://bucket#x', /fragment/],
    ['s3://bucket?endpoint=localhost:9000', /must be an http:\/\/ or https:\/\/ URL/],
    ['s3://bucket?endpoint=not a url', /is not a URL/],
    ['s3://bucket?endpoint=ftp://h', /http:\/\/ or https:\/\//],
    ['s3://bucket?endpoint=', /is not a URL/],
    ['s3://bucket?endpoint=http://h?x=1', /query or fragment/],
    ['s3://bucket?endpoint=http://h&endpoint=http://i', /given twice/],
    ['s3://bucket?region=', /not a valid region/],
    ['s3://bucket?region=EU West', /not a valid region/],
    ['s3://bucket?path-style=yes', /path-style must be true or false/],
    ['s3://bucket?pathstyle=true', /unknown option "pathstyle" \(known: endpoint, region, path-style\)/],
    ['s3://bucket?access_key=AKIA', /unknown option "access_key"/],
    ['file://relative/path', /three slashes/],
    ['file:/abs', /must start with "file:\/\/" \(did you mean "file:\/\/\/abs"\?\)/],
    ['file:///a?x', /no query/],
  ];
  for (const [url, why] of rejected) {
    test(`rejects ${JSON.stringify(url)}`, () => {
      assert.throws(() => parseRepositoryUrl(url), (err: unknown) => {
        assert.ok(err instanceof VmvaultError, String(err));
        assert.equal(err.code, 'BAD_REPOSITORY_URL');
        assert.match(err.message, why);
        assert.ok(err.message.startsWith(`bad repository URL "${url}"`), err.message);
        assert.match(err.message, /accepted forms:[\s\S]*s3:\/\/BUCKET\[\/PREFIX\]/);
        return true;
      });
    });
  }

  test('credentials in a rejected URL are masked in the message', () => {
    const cases = [
      's3://AKIAXXX:verysecret@bucket/p',
      's3://bucket?endpoint=http://admin:verysecret@minio:9000',
      's3:/AKIAXXX:verysecret@bucket',
      's4://user:verysecret@host/x',
    ];
    for (const url of cases) {
      assert.throws(() => parseRepositoryUrl(url), (err: unknown) => {
        assert.ok(err instanceof VmvaultError && err.code === 'BAD_REPOSITORY_URL');
        assert.ok(!err.message.includes('verysecret'), err.message);
        assert.match(err.message, /\*\*\*@/);
        return true;
      }, url);
    }
  });

  test('maskCredentials masks plain and URL-encoded user:password@', () => {
    assert.equal(maskCredentials('s3://b?endpoint=http://u:p@h:9000'), 's3://b?endpoint=http://***@h:9000');
    assert.equal(maskCredentials('s3://b?endpoint=http%3A%2F%2Fu%3Ap%40h'), 's3://b?endpoint=http%3A%2F%2F***%40h');
    assert.equal(maskCredentials('/plain/path'), '/plain/path');
  });
});

describe('openStorage', () => {
  test('opens a local path, resolved against the working directory', async () => {
    const storage = openStorage('some/dir');
    assert.equal(storage.location, path.resolve('some/dir'));
    await storage.close();
  });

  test('opens an s3 URL without I/O, printing no credentials', async () => {
    const storage = openStorage('s3://bucket/p?endpoint=http://127.0.0.1:1');
    assert.equal(storage.location, 's3://bucket/p at http://127.0.0.1:1');
    await storage.close();
  });

  test('rejects a bad URL', () => {
    assert.throws(() => openStorage('s3:bucket'), (err: unknown) => err instanceof VmvaultError && err.code === 'BAD_REPOSITORY_URL');
  });
});
