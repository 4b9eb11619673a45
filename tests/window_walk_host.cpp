// templates/window_walk.cuh compiled for the CPU (tests/test_window_walk_cpu.py builds and runs it): every block of a
// head walks its windows as a kernel does, one thread for the block, and this checks that each window is walked
// exactly once, with the term of its mask window. Reads lines of "windows mask_windows blocks has_mask flags...";
// prints "ok windows mask_windows blocks max_load max_fills" (a block's load: its windows plus MASKED_FILL_WINDOWS a
// fill), or a line starting with FAIL.
#include <cstdio>
#include <cstdlib>
#include <vector>
#define __device__
#define __forceinline__ inline
struct Dim { unsigned x; };
static Dim threadIdx{0}, blockDim{1};
static int __syncthreads_count(int p) { return p != 0; }
#include "window_walk.cuh"
using namespace fwagen;
int main() {
  int windows, mask_windows, blocks;
  while (scanf("%d %d %d", &windows, &mask_windows, &blocks) == 3) {
    int has_mask;
    scanf("%d", &has_mask);
    std::vector<unsigned char> flags(mask_windows);
    for (int i = 0; i < mask_windows; ++i) {
      int f;
      scanf("%d", &f);
      flags[i] = f;
    }
    std::vector<int> seen(windows, 0);
    int max_load = 0, max_fills = 0;
    for (int slot = 0; slot < blocks; ++slot) {
      WindowWalk walk = plan_window_walk(has_mask ? flags.data() : nullptr, windows, mask_windows, slot, blocks);
      WindowCursor at = first_window(walk, slot);
      int filled = -2, fills = 0;
      for (int step = 0; step < walk.steps; ++step) {
        long long b = at.window(walk);
        if (b < 0 || b >= windows) {
          printf("FAIL window %lld out of range\n", b);
          return 1;
        }
        int term = at.term(walk);
        int w = (int)(b % mask_windows);
        bool m = has_mask && flags[w];
        if (m ? term != w : term != -1) {
          printf("FAIL term %d for window %lld\n", term, b);
          return 1;
        }
        if (term != filled) filled = term, ++fills;
        seen[b]++;
        at.advance(walk);
      }
      const int load = walk.steps + fills * MASKED_FILL_WINDOWS;
      if (load > max_load) max_load = load;
      if (fills > max_fills) max_fills = fills;
    }
    for (int b = 0; b < windows; ++b)
      if (seen[b] != 1) {
        printf("FAIL window %d walked %d times\n", b, seen[b]);
        return 1;
      }
    printf("ok %d %d %d %d %d\n", windows, mask_windows, blocks, max_load, max_fills);
  }
  return 0;
}
