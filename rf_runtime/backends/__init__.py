"""Execution backends of the streamer: what runs the model for a ``Stream``.

- ``base``: the ``Backend`` interface, ``ModelInfo``, the state arrays of a snapshot;
- ``pytorch``: the reference models in PyTorch (``TorchBackend``);
- ``engine``: an engine bundle through the runners, onnxruntime or TensorRT, without torch (``EngineBackend``);
- ``select``: which runner family an engine bundle runs on, here (``choose_backend``).

Import the module you need; nothing here imports torch.
"""
