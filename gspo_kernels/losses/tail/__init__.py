"""The fused loss tail of the TRL family: everything :func:`..core.compose` does after the
log-prob kernel, as two Triton kernels forward and one backward over the O(N*T) per-token
values, equal to the torch composition of :mod:`..objectives`, :mod:`..masks` and
:mod:`..aggregate` (which stays the CPU path and the reference; tests/test_tail.py).

- :mod:`.math`: the per-token math as Triton device functions; the slot layout of the
  buffers the kernels share; the codes of the options (``tl.constexpr``).
- :mod:`.checks`: the loss's value checks as device functions of the forward kernel.
- :mod:`.kernels`: the forward kernels (per-sequence pass, fixed-order reduce);
  :mod:`.kernels_bwd`: the backward kernel.
- :mod:`.launch`: the launch plan: which compiled variant a call needs (:class:`.launch.TailSpec`),
  the option floats as one cached fp64 device tensor, the launches.
- :mod:`.autograd`: the autograd function, the dispatch from :func:`..core.compose`
  (:func:`.autograd.applies`, :func:`.autograd.fused_compose`) and the metrics it reports.
"""
