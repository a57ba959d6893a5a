/** Either JSON on stdout, or the human text. */
export function print(json: boolean | undefined, value: unknown, human: () => string): void {
  if (json) process.stdout.write(JSON.stringify(value, null, 2) + '\n');
  else process.stdout.write(human() + '\n');
}
