"""The kept, pre-projector visual tokens of a batch: what encode+select ships to the LLM worker.

A plain container of tensors, ints and floats (picklable, no model references), so a Ray actor can send it to
another machine; ``to(dtype=...)`` casts the features for the trip (bf16/fp16 halves the bytes).

Shape legend:
    B   clips (or images) in the batch
    N   longest kept token count in the batch; row b is valid on [:lengths[b]], padding after
    Dv  vision hidden size (pre-projector)
    T   frames per clip (1 for an image); S_f tokens per frame in the untouched model's span
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class VisualTokens:
    features: torch.Tensor  # [B, N, Dv]
    lengths: list[int]  # [B] kept tokens per row
    frame_index: torch.Tensor  # [B, N] long: frame of each kept token, −1 on padding
    token_index: torch.Tensor  # [B, N] long: index in the frame's span (see span_has_cls), −1 on padding
    num_frames: int  # T
    tokens_per_frame: int  # S_f: tokens per frame in the untouched model's placeholder span
    span_has_cls: bool  # True: token_index 0 is the frame's [CLS], patch j is j + 1; False: patch j is j
    modality: str  # "video" | "image"
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def tokens_in(self) -> int:
        """Visual tokens the untouched model would put in one row's span (T · S_f)."""
        return self.num_frames * self.tokens_per_frame

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VisualTokens:
        return replace(
            self,
            features=self.features.to(device=device, dtype=dtype),
            frame_index=self.frame_index.to(device=device),
            token_index=self.token_index.to(device=device),
            timings_s=dict(self.timings_s),
        )

    def kept_per_frame(self) -> list[list[int]]:
        """[B][T] kept tokens per frame (the [CLS] included when span_has_cls)."""
        out = []
        for b, n in enumerate(self.lengths):
            counts = torch.bincount(self.frame_index[b, :n].cpu(), minlength=self.num_frames)
            out.append([int(c) for c in counts])
        return out

    def kept_patch_indices(self) -> list[list[list[int]]]:
        """[B][T][kept] raster indices (0..P−1) of the kept patches of each frame ([CLS] excluded)."""
        offset = 1 if self.span_has_cls else 0
        out = []
        for b, n in enumerate(self.lengths):
            frames = self.frame_index[b, :n].cpu()
            tokens = self.token_index[b, :n].cpu()
            per_frame = []
            for t in range(self.num_frames):
                idx = tokens[(frames == t) & (tokens >= offset)] - offset
                per_frame.append([int(i) for i in idx])
            out.append(per_frame)
        return out

    def split(self) -> list[VisualTokens]:
        """One VisualTokens per row, each trimmed to its own length."""
        rows = []
        for b, n in enumerate(self.lengths):
            rows.append(
                replace(
                    self,
                    features=self.features[b : b + 1, :n],
                    lengths=[n],
                    frame_index=self.frame_index[b : b + 1, :n],
                    token_index=self.token_index[b : b + 1, :n],
                    timings_s=dict(self.timings_s),
                )
            )
        return rows

    @staticmethod
    def cat(parts: list[VisualTokens]) -> VisualTokens:
        """Stack rows of several VisualTokens (e.g. from different jobs) into one padded batch."""
        if not parts:
            raise ValueError("visual_tokens: need at least one VisualTokens to concatenate")
        first = parts[0]
        for part in parts[1:]:
            if (part.num_frames, part.tokens_per_frame, part.span_has_cls, part.modality) != (
                first.num_frames,
                first.tokens_per_frame,
                first.span_has_cls,
                first.modality,
            ):
                raise ValueError("visual_tokens: rows to batch must share num_frames, tokens_per_frame and modality")
        width = max(p.features.shape[1] for p in parts)

        def pad(x: torch.Tensor, value: float) -> torch.Tensor:
            extra = width - x.shape[1]
            if extra == 0:
                return x
            shape = (x.shape[0], extra, *x.shape[2:])
            return torch.cat([x, x.new_full(shape, value)], dim=1)

        return VisualTokens(
            features=torch.cat([pad(p.features, 0.0) for p in parts]),
            lengths=[n for p in parts for n in p.lengths],
            frame_index=torch.cat([pad(p.frame_index, -1) for p in parts]),
            token_index=torch.cat([pad(p.token_index, -1) for p in parts]),
            num_frames=first.num_frames,
            tokens_per_frame=first.tokens_per_frame,
            span_has_cls=first.span_has_cls,
            modality=first.modality,
            timings_s=dict(first.timings_s) if len(parts) == 1 else {},
        )
