// web/fossil.js applies the deltas of npm fossil-delta and of cluster/fossil.py, and refuses corrupt ones.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { applyDelta, checksum, FossilError, outputSize } from "../fossil.js";

const FIXTURES = JSON.parse(readFileSync(new URL("../../tests/fixtures/fossil_delta.json", import.meta.url), "utf8"));
const bytes = (b64) => new Uint8Array(Buffer.from(b64, "base64"));
const ascii = (text) => new TextEncoder().encode(text);
function base64Number(n) {
  let text = "";
  do {
    text = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"[n % 64] + text;
    n = Math.floor(n / 64);
  } while (n);
  return text;
}
const cases = (kind) => FIXTURES[kind].map((c) => ({ name: c.name, source: bytes(c.source), target: bytes(c.target), delta: bytes(c.delta) }));

for (const kind of ["npm", "python"]) {
  test(`the ${kind} deltas of the fixtures rebuild their targets byte for byte`, () => {
    const all = cases(kind);
    assert.ok(all.length >= 10);
    for (const { name, source, target, delta } of all) {
      assert.equal(outputSize(delta), target.length, name);
      assert.deepEqual(applyDelta(source, delta), target, name);
    }
  });
}

const book = cases("python").find((c) => c.name.startsWith("order book, 4"));

function refused(source, delta, pattern) {
  assert.throws(() => applyDelta(source, delta), (error) => error instanceof FossilError && pattern.test(error.message));
}

test("a truncated delta throws FossilError", () => {
  for (let length = 0; length < book.delta.length; length++) refused(book.source, book.delta.subarray(0, length), /./);
});

test("a bad checksum throws FossilError", () => {
  const text = new TextDecoder().decode(book.delta);
  const trailer = `${base64Number(checksum(book.target))};`;
  assert.ok(text.endsWith(trailer));
  const forged = text.slice(0, -trailer.length) + `${base64Number((checksum(book.target) + 1) % 2 ** 32)};`;
  refused(book.source, ascii(forged), /checksum/);
});

test("a delta made for another source throws FossilError", () => {
  const other = cases("python").find((c) => c.name.startsWith("order book, 5"));
  refused(other.source, book.delta, /./);
});

test("a copy outside the source throws FossilError", () => {
  refused(ascii("abcd"), ascii("3\n3@2,0;"), /past the 4-byte source/);
  refused(ascii("abcd"), ascii("1\n1@4,0;"), /past the/);
});

test("a wrong length throws FossilError", () => {
  const sum = checksum(ascii("hello"));
  const trailer = base64Number;
  assert.deepEqual(applyDelta(new Uint8Array(), ascii(`5\n5:hello${trailer(sum)};`)), ascii("hello"));
  refused(new Uint8Array(), ascii(`4\n5:hello${trailer(sum)};`), /announced 4/);
  refused(new Uint8Array(), ascii(`6\n5:hello${trailer(sum)};`), /announced 6/);
  refused(new Uint8Array(), ascii("5\n9:hel"), /longer than the rest/);
});

test("malformed deltas say what is wrong", () => {
  const source = ascii("hello world, a source of some length");
  for (const [delta, pattern] of [
    ["", /target size/],
    ["5", /header/],
    ["5x", /newline/],
    ["5\n5!hello", /unknown segment operator/],
    ["5\n5@0;", /terminated by ','/],
    ["5\n:hello", /segment length/],
    ["zzzzzzz\n", /32 bits/],
    ["0\n0;junk", /follow the checksum/],
    ["0\n", /without its checksum/],
    ["zzzzz\n0@0,0;", /more than it can build/],
  ]) {
    refused(source, ascii(delta), pattern);
  }
  assert.throws(() => applyDelta(ascii("x".repeat(64)), ascii("V00\n0@0,0;"), { maxSize: 65536 }), /more than the 65536 allowed/);
});

test("a flipped byte never yields other bytes silently", () => {
  for (let position = 0; position < book.delta.length; position++) {
    const corrupt = book.delta.slice();
    corrupt[position] ^= 0x21;
    try {
      assert.deepEqual(applyDelta(book.source, corrupt), book.target, `flip at ${position}`);
    } catch (error) {
      if (!(error instanceof FossilError)) throw error;
    }
  }
});

test("the checksum is the sum of big-endian words, zero-padded, modulo 2^32", () => {
  assert.equal(checksum(new Uint8Array()), 0);
  assert.equal(checksum(Uint8Array.of(0, 0, 0, 1, 0, 0, 0, 2)), 3);
  assert.equal(checksum(Uint8Array.of(1)), 0x01000000);
  assert.equal(checksum(Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0, 0, 0, 2)), 1);
});

test("applyDelta takes Uint8Arrays only", () => {
  assert.throws(() => applyDelta("abc", ascii("0\n0;")), TypeError);
});
