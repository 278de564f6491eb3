"""The Jamba model (hybrid Transformer-Mamba MoE). Its implementation is tracked in the model issue;
this package exists so that the project's three towers (pipeline, model, train) are importable from day one."""
