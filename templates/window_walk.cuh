// Which windows a block of a whole-window kernel walks, and in what order. Plain CUDA: no template variables.
//
// A block keeps the (bias + mask) term of the windows it walks in shared memory, and fills it again whenever the
// term changes: each fill is a pause of the whole block, worth about a window or two of work. Window b uses mask
// window b % mask_windows; Swin's shift mask is all zero in most of them (49 of 64 at window 12), and those windows
// all share one term, the bias alone. So the mask windows fall into classes: each window whose mask has a nonzero
// element is a class of its own (`images` windows), and every all-zero one joins a single class (the bias alone).
// The blocks of a head split that work as follows: the masked classes go round the blocks, one fill each (cut into
// equal parts of their images where a class alone would outweigh a block's fair share), and the all-zero class's
// windows are shared out in contiguous runs so that every block has about the same work, a masked piece counting
// MASKED_FILL_WINDOWS windows more for its fill. A block thus fills at most one term more than it has masked pieces,
// however many mask windows it crosses.
//
// Which mask windows are all zero is read on the device each call (`nonzero`, a byte a mask window, written by a
// reduction over the mask just before the kernel), so that the walk follows the mask as it is now: a cache on the
// host could go stale when the mask changes in place, or not be readable during CUDA-graph capture.
// The assignment depends on the mask's zero pattern only, so a given mask always gives the same order of the sums
// of dbias, and bitwise-identical results.
#pragma once

namespace fwagen {

constexpr int MASKED_FILL_WINDOWS = 2;

// A block's walk, fixed at its start. Kept in shared memory by the kernels (they are short of registers): only the
// cursor (WindowCursor) lives in registers.
struct WindowWalk {
  const unsigned char* nonzero;  // a byte a mask window: its mask has a nonzero element; null without a mask
  int mask_windows, images, blocks;  // blocks: how many blocks share the head's windows
  int parts, part_images;            // a masked class is cut into `parts` pieces of up to `part_images` windows
  int masked_steps, steps;           // the block's windows of masked pieces, then of the all-zero class
  int first_w, zero_first_w, zero_first_img;  // the class of its first masked piece; where its all-zero run starts

  __device__ __forceinline__ bool masked(int window) const { return nonzero != nullptr && nonzero[window] != 0; }
  // The first mask window at or after `from` whose kind is `want_masked` (mask_windows if none).
  __device__ __forceinline__ int next_of_kind(int from, bool want_masked) const {
    while (from < mask_windows && masked(from) != want_masked) ++from;
    return from;
  }
  // Windows in masked piece `piece` (piece / parts: which masked class; piece % parts: which part of its images).
  __device__ __forceinline__ int piece_first_image(int piece) const { return piece % parts * part_images; }
  __device__ __forceinline__ int piece_end_image(int piece) const {
    const int end = piece_first_image(piece) + part_images;
    return end < images ? end : images;
  }
};

// Step t of a walk is window img * mask_windows + w; in the masked phase, of masked piece `piece`.
struct WindowCursor {
  int t, w, img, piece;

  __device__ __forceinline__ long long window(const WindowWalk& walk) const {
    return (long long)img * walk.mask_windows + w;
  }
  // The term of the current window: its mask window for a masked class, -1 for the bias alone.
  __device__ __forceinline__ int term(const WindowWalk& walk) const { return t < walk.masked_steps ? w : -1; }

  __device__ __forceinline__ void advance(const WindowWalk& walk) {
    if (++t >= walk.steps) return;
    if (t == walk.masked_steps) {
      w = walk.zero_first_w, img = walk.zero_first_img;
      return;
    }
    if (t < walk.masked_steps) {
      if (++img < walk.piece_end_image(piece)) return;
      const int next = piece + walk.blocks;  // this block's next masked piece
      for (int c = piece / walk.parts; c < next / walk.parts; ++c) w = walk.next_of_kind(w + 1, true);
      piece = next, img = walk.piece_first_image(next);
      return;
    }
    if (++img < walk.images) return;
    img = 0, w = walk.next_of_kind(w + 1, false);
  }
};

__device__ __forceinline__ WindowCursor first_window(const WindowWalk& walk, int slot) {
  if (walk.masked_steps > 0) return WindowCursor{0, walk.first_w, walk.piece_first_image(slot), slot};
  return WindowCursor{0, walk.zero_first_w, walk.zero_first_img, slot};
}

// Block `slot` (of `blocks`) of a head over `windows` windows; mask_windows >= 1 (1 without a mask). Every thread of
// the block must call it (it counts the masked classes with block-wide barriers) and gets the same walk.
__device__ __forceinline__ WindowWalk plan_window_walk(const unsigned char* nonzero, int windows, int mask_windows,
                                                       int slot, int blocks) {
  WindowWalk walk;
  walk.nonzero = nonzero;
  walk.mask_windows = mask_windows;
  walk.images = windows / mask_windows;
  walk.blocks = blocks;
  int masked_classes = 0;
  if (nonzero != nullptr)
    for (int first = 0; first < mask_windows; first += blockDim.x) {
      const int window = first + (int)threadIdx.x;
      masked_classes += __syncthreads_count(window < mask_windows && nonzero[window] != 0);
    }
  const long long images = walk.images, fill = MASKED_FILL_WINDOWS;
  const long long zero_windows = (long long)(mask_windows - masked_classes) * images;
  // A block's fair share of the work in windows; masked classes larger than that (less a fill) are cut in parts.
  const long long fair = (windows + masked_classes * fill + blocks - 1) / blocks;
  const long long most = fair - fill > 1 ? fair - fill : 1;
  walk.parts = images > most ? (int)((images + most - 1) / most) : 1;
  walk.part_images = images > 0 ? (int)((images + walk.parts - 1) / walk.parts) : 0;
  walk.parts = walk.part_images > 0 ? (int)((images + walk.part_images - 1) / walk.part_images) : 1;
  // Masked pieces go round the blocks; blocks slot < extra have one more than the others: loads heavy and light, in
  // windows (a piece counted whole).
  const long long pieces = (long long)masked_classes * walk.parts;
  const long long fewer = pieces / blocks, extra = pieces % blocks;
  const long long light = fewer * (walk.part_images + fill), heavy = light + walk.part_images + fill;
  long long share_heavy, share_light;  // windows of the all-zero class a heavy and a light block take
  if (extra == 0) {
    share_heavy = 0, share_light = (zero_windows + blocks - 1) / blocks;
  } else if (zero_windows <= (blocks - extra) * (heavy - light)) {  // the light blocks take them all
    share_heavy = 0, share_light = (zero_windows + blocks - extra - 1) / (blocks - extra);
  } else {
    const long long target = (zero_windows + extra * heavy + (blocks - extra) * light + blocks - 1) / blocks;
    share_heavy = target - heavy, share_light = target - light;
  }
  const long long start = slot < extra ? slot * share_heavy : extra * share_heavy + (slot - extra) * share_light;
  const long long zero_first = start < zero_windows ? start : zero_windows;
  const long long zero_end_unclamped = start + (slot < extra ? share_heavy : share_light);
  const long long zero_end = zero_end_unclamped < zero_windows ? zero_end_unclamped : zero_windows;
  int masked_steps = 0;
  for (long long piece = slot; piece < pieces; piece += blocks)
    masked_steps += walk.piece_end_image((int)piece) - walk.piece_first_image((int)piece);
  walk.masked_steps = masked_steps;
  walk.steps = masked_steps + (int)(zero_end - zero_first);
  // The zero_first-th window of the all-zero class, which lists mask window by mask window, images innermost.
  walk.zero_first_img = images > 0 ? (int)(zero_first % images) : 0;
  int w = walk.next_of_kind(0, false);
  for (long long skip = images > 0 ? zero_first / images : 0; skip > 0; --skip) w = walk.next_of_kind(w + 1, false);
  walk.zero_first_w = w;
  w = walk.next_of_kind(0, true);  // the class of masked piece `slot`
  for (int skip = 0; skip < slot / walk.parts && w < mask_windows; ++skip) w = walk.next_of_kind(w + 1, true);
  walk.first_w = w;
  return walk;
}

}  // namespace fwagen
