"""The offline phase of the paper (§3.1): build MiniELM before the online loop starts.

Q2Q pairs from the query–product graph (``q2q``) → SFT of the teacher T (``sft``) → a half-depth student
S (every other layer) SFT'd too → reverse-KL distillation T → S (``distill``) → the paper's Table 2
(``evaluate``) → publish S as the ``production`` policy (``build``). ``cli.app`` exposes it as
``qrloop offline ...``.

Data flows one way through these modules; each later one imports only earlier ones.
"""
