"""The four steps of ExpertSteer (arXiv 2505.12313), one module each, plus the baselines:

1. `align`: per-layer affine auto-encoders f_i/g_i between expert and target hidden sizes
   (and `translate`, the target-tied closed-form alternative);
2. `pair`: expert/target layer pairs chosen by mutual information;
3. `rfm`: the Recursive Feature Machine (kernel ridge regression + AGOP) whose top
   eigenvector is the steering direction; `extractors` dispatches to it and to the
   baselines (mean difference, PCA, logistic, random); `vectors` stores the result;
4. `steer`: the vectors added to the target's residual stream during generation.
"""
