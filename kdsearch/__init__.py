"""kdsearch's foundations, shared by every room (search_space, storage, distill, service) and imported by none of
them in return: the error hierarchy (``kdsearch.errors``), the distillation terms (``kdsearch.terms``) and the
process and port helpers that tests and benches share (``kdsearch.testing``)."""
