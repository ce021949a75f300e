"""The `triton` expert backend's kernels (each family in its own module: up.py, down.py, ...; the Gluon ones in
*_gluon.py) and their launchers (up_launch, down_launch, mlp_launch, wgrad_launch; their tile configs in
tile_configs, `auto`'s Gluon choices in auto_ws, M-tile orders in tile_order). Import lazily: they need triton.

Three grouped GEMMs cover the whole forward and backward, each reading tokens *through* the routing
plan instead of from materialised copies (ScatterMoE's idea; the code here is our own):

  up      out[r] = epilogue(X[token[r]] @ W[e]^T)        gather fused into the A-operand loads
          fwd: X = x,  W = w1 [N, F1, D]; epilogue = +b1, save h (pre-activation), a = act(h)
          bwd: X = dy, W = w2 [N, E, D];  epilogue = da -> dgate partials (da . a),
               dh = gate * da * act'(h) (GLU: the gate and up halves), ga = gate * a (the dW2 operand),
               db1 += column sums of dh (fp32 atomics, one per column per tile)
  down    buf[order[r]] = scale[r] * (A[r] @ W[e])       scatter fused into the store
          fwd: A = a,  W = w2 (scale = gate) -> y  = buf.view(T, K, D).sum(1)
          bwd: A = dh, W = w1 (no scale)     -> dx = buf.view(T, K, D).sum(1)
  wgrad   dW[e] = sum_{r in e} L[r]^T R[token[r]]       (grouped weight gradients; R gathered in-kernel
          dW2: L = ga, R = dy;  dW1: L = dh, R = x     or pre-gathered, see TritonBackend(wgrad=...))
  mlp     y[token[r]] += gate * act(X[token[r]] @ W1[e]^T + b1) @ W2[e]   (the fused forward: up and down
          per M-tile, `a` kept on chip; `mlp.py`; TritonBackend(fused_forward=...), on by default for
          activations without a gate on Hopper)

The routing plan itself (the pairs sorted by expert) is a counting sort in two small kernels
(`routing_plan.py`). Expert e owns sorted rows offsets[e]:offsets[e+1]. The M-tiles of `up`/`down` never
straddle two experts: every program finds its (expert, first row) from the offsets with a vectorised cumsum over
the per-expert tile counts, so the grid is a host-side upper bound (cdiv(M, BM) + N tiles) and no
count ever travels to the host.
"""
