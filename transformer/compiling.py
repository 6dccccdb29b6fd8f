"""torch.compile for token batches (``trainer.compile=true``): ``compile_dynamic``.

Token batches change shape at every step: B sentences, a source of S tokens and a target
of T. ``torch.compile(dynamic=True)`` traces B, S and T as symbols, so that one graph
serves every batch. Three things made it trace again, each time costing as much as the
first compile (40 s on an H100 for Transformer-base, where a training run compiled three
graphs in its first steps: results/gpu/h100-compile/recompiles.log):

- **Duck sizing.** Sizes that are equal when traced get one symbol. A first batch with
  S == T (29 and 29 in that log) compiled a graph for S == T only, and the next batch
  compiled again. ``compile_dynamic`` turns duck sizing off; B, S and T stay three symbols.
- **Float settings traced as symbols.** With ``dynamic=True`` torch traces the modules'
  float attributes (dropout rates, layer norm's eps, nn.Embedding's norm_type) as
  symbols, then finds it must fix their values and traces the whole model a second time
  before compiling it. ``compile_dynamic`` fixes them when first traced
  (``specialize_float``); none changes during training.
- **The padded key mask.** In eager mode ``attention.key_bias`` lays out its rows 16
  elements apart for the memory-efficient SDPA kernel. Traced, that layout made the graph
  specialise on whether S is a multiple of 16 (contiguous or not). Under compilation
  ``key_bias`` makes a plain contiguous mask and leaves the layout to the compiler.

A batch of one row compiles one more graph, once: torch traces a size of 1 as a case of its
own. Padded batches have many sentences; packed rows (``trainer.packed_rows``) come to one
row only under a token budget of about one row's width.

One guard stays on CUDA: inductor copies an SDPA mask whose rows are not 8-element
aligned, and guards on ``S % 8`` to know which graph does it, so a CUDA run compiles two
graphs (S a multiple of 8 and not), the second within the first few batches. Padding
every source to a multiple of 8 would avoid it at the price of computing on the padding
at every step. ``tests/test_compile.py`` checks that on the CPU each compiled function is
traced once and serves batches of every kind above.

With duck sizing off, torch 2.13's inductor failed an internal assertion ("sources must not
be empty for symbol ...") on a model whose inputs were views of one tensor (a target input
sliced from the source tensor). The trainer's batches never are (a test checks).
"""

from __future__ import annotations

import torch


def compile_dynamic(fn, mode: str = "default", **options):
    """``torch.compile(fn, dynamic=True, mode=mode, **options)`` with duck sizing off and
    float settings fixed when traced (the module docstring). Both settings are
    process-wide, as torch keeps them: Dynamo reads them whenever it traces, and every
    function this project compiles wants them so."""
    import torch.fx.experimental._config as shape_config

    # (private settings, and older torch releases may lack them: then its defaults stand)
    if hasattr(shape_config, "use_duck_shape"):
        shape_config.use_duck_shape = False
    if hasattr(torch._dynamo.config, "specialize_float"):
        torch._dynamo.config.specialize_float = True
    return torch.compile(fn, dynamic=True, mode=mode, **options)
