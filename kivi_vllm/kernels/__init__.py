"""Triton kernels for the KIVI pages (store, decode, prefill), one launcher per file: the GPU milestone.

They must read and write exactly the bytes of :class:`kivi_vllm.layout.PageLayout` and reproduce
:func:`kivi_vllm.reference.forward`, which the tests use as their oracle. Empty until then; the backend uses the
PyTorch path on every device.
"""
