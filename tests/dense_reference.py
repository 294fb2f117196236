"""An independent dense Self-Forcing inference loop: contiguous per-layer K/V tensors rolled in place with a
sink, exactly as the reference ``CausalWanSelfAttention`` keeps them (no pages, no policies, no engine)."""

import torch
import torch.nn.functional as F

from ff_engine.engine.sampler import FlowMatchSchedule


class DenseRollingCache:
    def __init__(self, layers, size_tokens, heads, head_dim, sink_tokens):
        self.k = [torch.zeros(size_tokens, heads, head_dim) for _ in range(layers)]
        self.v = [torch.zeros(size_tokens, heads, head_dim) for _ in range(layers)]
        self.global_end = [0] * layers
        self.local_end = [0] * layers
        self.size, self.sink = size_tokens, sink_tokens
        self.current_start = 0

    def __call__(self, layer, q, k, v, q_pre, positions):
        n = q.shape[0]
        end = self.current_start + n
        K, V = self.k[layer], self.v[layer]
        g, l = self.global_end[layer], self.local_end[layer]
        if end > g and n + l > self.size:  # roll: drop the oldest non-sink tokens
            evict = n + l - self.size
            keep = l - evict - self.sink
            K[self.sink:self.sink + keep] = K[self.sink + evict:self.sink + evict + keep].clone()
            V[self.sink:self.sink + keep] = V[self.sink + evict:self.sink + evict + keep].clone()
            l_end = l + end - g - evict
        else:
            l_end = l + end - g
        K[l_end - n:l_end], V[l_end - n:l_end] = k, v
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], K[:l_end].transpose(0, 1)[None],
                                             V[:l_end].transpose(0, 1)[None])[0].transpose(0, 1)
        self.global_end[layer], self.local_end[layer] = end, l_end
        return out


def dense_generate(model, prompt, num_frames, local_attn_frames, sink_frames, initial_noise, step_noise):
    """local_attn_frames: cache size in frames *including* the block being generated (-1: global)."""
    g = model.geometry
    tpf, fpb = g.tokens_per_frame, g.frames_per_block
    size = (num_frames if local_attn_frames == -1 else local_attn_frames) * tpf
    cache = DenseRollingCache(g.num_layers, size, g.num_heads, g.head_dim, sink_frames * tpf)
    sched = FlowMatchSchedule()
    ps = model.encode_prompt(prompt)
    noise = list(step_noise)
    out = []
    for b in range(num_frames // fpb):
        cache.current_start = b * fpb * tpf
        x = initial_noise[b * fpb:(b + 1) * fpb][None]
        steps = sched.denoising_timesteps
        for i, t in enumerate(steps):
            tt = torch.full((1, fpb), float(t))
            flow = model.forward(x, tt, [ps], [b * fpb], cache)
            x0 = sched.to_x0(x, flow, tt)
            if i < len(steps) - 1:
                x = sched.add_noise(x0, noise.pop(0)[None], torch.full((1, fpb), float(steps[i + 1])))
        out.append(x0[0])
        model.forward(x0, torch.zeros(1, fpb), [ps], [b * fpb], cache)
    return torch.cat(out)
