/**
 * Types of web/fossil.js: applying Fossil deltas (docs/DELTA.md) in the browser.
 */

/** A delta that cannot be applied to this source: corrupt, truncated, or made for another base. */
export declare class FossilError extends Error {
  constructor(message: string);
  name: "FossilError";
}

export interface ApplyOptions {
  /** Refuse a delta that announces a larger target (bytes), before building it. Default: no limit. */
  maxSize?: number;
}

/** Rebuild the target from `source` and `delta`; throws FossilError unless it has exactly the announced length and checksum. */
export declare function applyDelta(source: Uint8Array, delta: Uint8Array, options?: ApplyOptions): Uint8Array;

/** The target length (bytes) a delta announces in its header; throws FossilError on a malformed header. */
export declare function outputSize(delta: Uint8Array): number;

/** The format's checksum: the sum mod 2^32 of the big-endian 32-bit words of `bytes`, the last one zero-padded. */
export declare function checksum(bytes: Uint8Array): number;
