"""A diffusers attention processor that runs the attention itself on pyserve's dense kernel.

It does what diffusers' default processor does around the product (projections, group and
spatial norms, 4-D feature maps, residual, output rescale); masks are not supported (Stable
Diffusion's UNet and VAE use none)."""

import torch

from pyserve import kernels


class KernelAttnProcessor:
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("pyserve's attention processor takes no attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        batch, head_dim = query.shape[0], key.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = _attention(q, k, v, attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@torch.library.custom_op("pyserve_diffusion::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """An operator of its own, so that a traced network calls the kernel rather than recording
    what it did to one example."""
    try:
        return kernels.dense_attention(q, k, v, scale=scale)
    except kernels.KernelInputError:  # a shape the kernels do not take (e.g. a 512-wide VAE head)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


@_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape)


def use_kernel_attention(module: torch.nn.Module) -> int:
    """Route every diffusers `Attention` block inside `module` through the kernel; returns how many."""
    from diffusers.models.attention_processor import Attention

    blocks = [m for m in module.modules() if isinstance(m, Attention)]
    for block in blocks:
        block.set_processor(KernelAttnProcessor())
    return len(blocks)
