"""The test models, one module each, and the deterministic gradients pushed to them.

- ``embedding``: a dense layer and an embedding table with sparse-row gradients that depend
  on the pulled weights (end-to-end training).
- ``dense``: one dense layer, Adam, gradients spanning 1e-3 to 1e2 (fault tests).
- ``mixed``: a matrix, a vector, an embedding table and a scalar (the server core).
- ``tiny``: two small variables and SGD (raw-stub transport and ops tests).
"""
