"""The MoE layer: router -> dispatch -> grouped experts -> combine.

Dimension legend used throughout this package:
  B batch, S sequence, T = B*S tokens, D model width, F expert hidden width,
  E routed FFN experts, E' router output width (E plus special slots),
  K slots per token, R rows of the dispatched (sorted, padded) layout,
  C capacity per expert (capacity mode only).
"""
