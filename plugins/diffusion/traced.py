"""The denoiser network as a TorchScript trace per latent size, on CPUs.

A diffusers UNet is hundreds of small Python modules; at the latent sizes a CPU serves, running
their `forward` methods costs about a sixth of each call. A trace records the network's
operations once and replays them without the Python, and shares the module's parameters (no
second copy of the weights). One trace serves every batch size of its latent size; each is
checked against the eager network on the call that made it, and a size whose trace fails or
disagrees stays eager (one log line).

Example:
    >>> denoiser = TracedDenoiser(unet)                   # doctest: +SKIP
    >>> out = denoiser(latents, timesteps, conditioning)  # doctest: +SKIP
"""

import logging
import warnings

import torch

log = logging.getLogger("pyserve.diffusion")

# What a trace may differ from the eager network by: summation order only.
TOLERANCE = 1e-3


class _Call(torch.nn.Module):
    """The UNet with positional arguments and a plain tensor out, as tracing wants."""

    def __init__(self, unet: torch.nn.Module, conditional: bool):
        super().__init__()
        self.unet, self.conditional = unet, conditional

    def forward(self, latents, timesteps, conditioning=None):
        kwargs = {"encoder_hidden_states": conditioning} if self.conditional else {}
        return self.unet(latents, timesteps, return_dict=False, **kwargs)[0]


class TracedDenoiser:
    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.traces: dict[tuple, torch.jit.ScriptModule | None] = {}  # None: this size runs eager

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor,
                 conditioning: torch.Tensor | None) -> torch.Tensor:
        args = (latents, timesteps) if conditioning is None else (latents, timesteps, conditioning)
        # diffusers takes shape-dependent branches on the latent size and at 64 rows (a copy
        # before upsampling): each of those is a trace of its own.
        key = (tuple(latents.shape[1:]), latents.shape[0] >= 64, timesteps.dtype,
               None if conditioning is None else tuple(conditioning.shape[1:]))
        if key not in self.traces:
            return self._trace(key, args)
        trace = self.traces[key]
        return self._eager(args) if trace is None else trace(*args)

    def _eager(self, args) -> torch.Tensor:
        return _Call(self.unet, len(args) == 3)(*args)

    def _trace(self, key: tuple, args) -> torch.Tensor:
        want = self._eager(args)
        try:
            with warnings.catch_warnings():  # shape asserts become constants: the key covers them
                warnings.simplefilter("ignore")
                trace = torch.jit.trace(_Call(self.unet, len(args) == 3), args, check_trace=False)
            got = trace(*args)
            error = (got - want).abs().max().item() / max(want.abs().max().item(), 1.0)
            if error > TOLERANCE:
                raise ValueError(f"the trace differs from the network by {error:.2e}")
        except Exception as exc:  # noqa: BLE001 - any failure leaves this size on the eager network
            log.warning("denoiser stays eager for latents %s: %s", key[0], exc)
            trace = None
        self.traces[key] = trace
        return want
