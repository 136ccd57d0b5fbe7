/**
 * Fossil delta decoding for the browser: rebuild an order book from the previous one and a
 * delta frame (issue 15, docs/DELTA.md), with no dependency.
 *
 *     import { applyDelta, FossilError } from "/web/fossil.js";
 *     const next = applyDelta(previousBytes, deltaBytes); // Uint8Array, or throws FossilError
 *
 * The format is Fossil SCM's (www/delta_format.wiki), the one npm `fossil-delta` and
 * Centrifugo use and `cluster/fossil.py` writes: a header `<target length>\n`, segments
 * `<n>@<offset>,` (copy n bytes of the source) and `<n>:<bytes>` (insert n bytes), and a
 * trailer `<checksum>;` — base-64 numbers (digits `0-9 A-Z _ a-z ~`), the checksum being the
 * sum mod 2^32 of the target's big-endian 32-bit words, zero-padded. Nothing is trusted: a
 * delta that does not rebuild exactly the announced length with the announced checksum
 * throws, so a client never shows a book built on the wrong base; it resubscribes instead.
 */

const DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";
const VALUE = new Int8Array(256).fill(-1);
for (let i = 0; i < DIGITS.length; i++) VALUE[DIGITS.charCodeAt(i)] = i;
const MAX_NUMBER = 2 ** 32 - 1; // the format's numbers are 32-bit
const NEWLINE = 0x0a;
const COPY = 0x40; // "@"
const COMMA = 0x2c;
const INSERT = 0x3a; // ":"
const TRAILER = 0x3b; // ";"

/** A delta that cannot be applied to this source: corrupt, truncated, or made for another base. */
export class FossilError extends Error {
  constructor(message) {
    super(message);
    this.name = "FossilError";
  }
}

/** Sum of the big-endian 32-bit words of `bytes`, the last one zero-padded, modulo 2^32. */
export function checksum(bytes) {
  let sum = 0;
  const whole = bytes.length - (bytes.length % 4);
  for (let i = 0; i < whole; i += 4) {
    sum = (sum + ((bytes[i] << 24) | (bytes[i + 1] << 16) | (bytes[i + 2] << 8) | bytes[i + 3])) >>> 0;
  }
  let last = 0;
  for (let i = whole, shift = 24; i < bytes.length; i++, shift -= 8) last |= bytes[i] << shift;
  return (sum + (last >>> 0)) >>> 0;
}

/** Reads base-64 numbers and single bytes from a delta, every read bounds-checked. */
class Reader {
  constructor(delta) {
    this.delta = delta;
    this.pos = 0;
  }

  number(what) {
    const { delta } = this;
    const start = this.pos;
    let value = 0;
    let pos = start;
    while (pos < delta.length) {
      const digit = VALUE[delta[pos]];
      if (digit < 0) break;
      value = value * 64 + digit; // not `<<`: 32-bit overflow must be seen, not wrapped
      pos++;
      if (value > MAX_NUMBER) throw new FossilError(`${what} at byte ${start} is larger than 32 bits`);
    }
    if (pos === start) {
      const found = start < delta.length ? `byte ${delta[start]}` : "the end of the delta";
      throw new FossilError(`expected a base-64 ${what} at byte ${start}, found ${found}`);
    }
    this.pos = pos;
    return value;
  }

  byte(what) {
    if (this.pos >= this.delta.length) throw new FossilError(`delta ends before its ${what}`);
    return this.delta[this.pos++];
  }
}

function readHeader(reader) {
  const size = reader.number("target size");
  if (reader.byte("header newline") !== NEWLINE) throw new FossilError("the target size is not followed by a newline");
  return size;
}

/** The target length a delta announces in its header. */
export function outputSize(delta) {
  return readHeader(new Reader(delta));
}

/**
 * Apply `delta` to `source` and return the target; throws FossilError unless the result has
 * exactly the announced length and checksum. `maxSize` refuses a larger announced target
 * before building anything.
 */
export function applyDelta(source, delta, { maxSize = Infinity } = {}) {
  if (!(source instanceof Uint8Array) || !(delta instanceof Uint8Array)) {
    throw new TypeError("applyDelta(source, delta) takes two Uint8Arrays");
  }
  const reader = new Reader(delta);
  const size = readHeader(reader);
  if (size > maxSize) throw new FossilError(`the delta announces ${size} bytes, more than the ${maxSize} allowed`);
  // every segment takes at least 4 delta bytes ("0@0,") and copies at most the whole source:
  // a larger header is a lie, refused before it allocates anything
  if (size > delta.length + Math.floor(delta.length / 4) * source.length) {
    throw new FossilError(`the delta announces ${size} bytes, more than it can build`);
  }
  const out = new Uint8Array(size);
  let written = 0;
  while (reader.pos < delta.length) {
    const at = reader.pos;
    const count = reader.number("segment length");
    const op = reader.byte("segment operator");
    if (op === COPY) {
      const offset = reader.number("copy offset");
      if (reader.byte("',' after a copy") !== COMMA) throw new FossilError(`the copy at byte ${at} is not terminated by ','`);
      if (offset + count > source.length) {
        throw new FossilError(`the copy at byte ${at} reads ${count} bytes at ${offset}, past the ${source.length}-byte source`);
      }
      if (written + count > size) throw new FossilError(`the copy at byte ${at} writes past the announced ${size} bytes`);
      out.set(source.subarray(offset, offset + count), written);
      written += count;
    } else if (op === INSERT) {
      const start = reader.pos;
      if (start + count > delta.length) {
        throw new FossilError(`the literal at byte ${at} is ${count} bytes, longer than the rest of the delta`);
      }
      if (written + count > size) throw new FossilError(`the literal at byte ${at} writes past the announced ${size} bytes`);
      out.set(delta.subarray(start, start + count), written);
      written += count;
      reader.pos = start + count;
    } else if (op === TRAILER) {
      if (written !== size) throw new FossilError(`the delta builds ${written} bytes, its header announced ${size}`);
      if (reader.pos !== delta.length) throw new FossilError(`${delta.length - reader.pos} bytes follow the checksum`);
      if (checksum(out) !== count) throw new FossilError("checksum mismatch: wrong source or a corrupt delta");
      return out;
    } else {
      throw new FossilError(`unknown segment operator ${op} at byte ${reader.pos - 1}`);
    }
  }
  throw new FossilError("the delta ends without its checksum trailer");
}
