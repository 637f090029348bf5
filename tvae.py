"""The Topographic VAE, its loss and its metrics, in one file.

Keller & Welling, "Topographic VAEs learn Equivariant Capsules", NeurIPS 2021
(arXiv 2109.01394). Read it top to bottom in the order the data flows:

    x ──z_encoder──► z ─┐
    x ──u_encoder──► u ─┴─grouper──► t ──decoder──► p(x|t)

The model sees a batch of B sequences of S frames flattened to N = B·S images,
frame index fastest (image i = b·S + t, SPEC §1.1). Every latent tensor is
(N, d) with d = n_caps·cap_dim, so it can always be viewed as
(B, S, n_caps, cap_dim). The paper's t is called `t` here (the authors' code
calls it s).

This module imports only torch and the standard library: copy it alone into
lecture material and it runs.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


# ─── Encoders: q(z|x) and q(u|x) ──────────────────────────────────────────────
# SPEC §1.2: both encoders are diagonal Gaussians with the same
# architecture and separate weights. The reference writes them as a full-image
# Conv2d followed by 1×1 convolutions: the same function (and the same default
# initialisation, fan_in = C·H·W) as Linear layers on the flattened image.

class GaussianEncoder(nn.Module):
    """Flattened image (C·H·W) → 3d → 2d → 2d units; the last 2d are (mean, log-variance)."""

    def __init__(self, n_pixels, d):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_pixels, 3 * d), nn.ReLU(),
            nn.Linear(3 * d, 2 * d), nn.ReLU(),
            nn.Linear(2 * d, 2 * d))

    def forward(self, x):                      # x (N, C·H·W)
        mean, logvar = self.net(x).chunk(2, dim=1)
        return mean, logvar                    # (N, d) each


def reparameterise(mean, logvar, noise):
    """A sample of Normal(mean, exp(logvar/2)) as a differentiable function of the noise."""
    return mean + torch.exp(0.5 * logvar) * noise


def kl_standard_normal(mean, logvar):
    """Analytic KL(N(m, σ²) ‖ N(0, 1)) summed over units: ½ Σ (σ² + m² − 1 − log σ²). (N, d) → (N,)."""
    return 0.5 * (logvar.exp() + mean ** 2 - 1 - logvar).sum(dim=1)


def log_normal(x, mean, logvar):
    """log N(x; mean, exp(logvar)) summed over units. (N, d) → (N,)."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 / logvar.exp()).sum(dim=1)


def log_standard_normal(x):
    """log N(x; 0, 1) summed over units, the prior p(z) = p(u). (N, d) → (N,)."""
    return -0.5 * (LOG_2PI + x ** 2).sum(dim=1)


# ─── Decoder: p(x|t) ─────────────────────────────────────────────────────────
# SPEC §1.3: t (d) → 2d → 3d → C·H·W → sigmoid, a Bernoulli on the pixel
# intensities in [0, 1]. The reference's layers are transposed convolutions, and
# two of their details decide the parameter count and the early training curve:
#   * the last layer has one bias per channel (C values), not one per pixel;
#   * every weight and bias is drawn from U(−1/√f, 1/√f) with f = the layer's
#     OUTPUT units (ConvTranspose2d's fan), not its input units as nn.Linear does.

class BernoulliDecoder(nn.Module):
    """t (N, d) → pixel probabilities (N, C·H·W)."""

    def __init__(self, d, image_shape):
        super().__init__()
        self.image_shape = image_shape
        channels, height, width = image_shape
        self.hidden = nn.Sequential(
            nn.Linear(d, 2 * d), nn.ReLU(),
            nn.Linear(2 * d, 3 * d), nn.ReLU())
        self.to_pixels = nn.Linear(3 * d, channels * height * width, bias=False)
        self.channel_bias = nn.Parameter(torch.empty(channels))
        with torch.no_grad():
            for layer in (self.hidden[0], self.hidden[2]):
                bound = layer.out_features ** -0.5
                layer.weight.uniform_(-bound, bound)
                layer.bias.uniform_(-bound, bound)
            bound = (channels * height * width) ** -0.5
            self.to_pixels.weight.uniform_(-bound, bound)
            self.channel_bias.uniform_(-bound, bound)

    def forward(self, t):                                         # t (N, d)
        logits = self.to_pixels(self.hidden(t))                   # (N, C·H·W)
        logits = logits.unflatten(1, (len(self.channel_bias), -1)) + self.channel_bias[:, None]
        return torch.sigmoid(logits.flatten(1))                   # (N, C·H·W)


def bernoulli_nll(probs, x):
    """−log p(x|t) = −Σ [x log p + (1−x) log(1−p)] over pixels, (N, C·H·W) → (N,).

    x holds intensities in [0, 1] (not binarised). p is clamped to [eps, 1 − eps]
    with eps the float32 machine epsilon, as torch.distributions.Bernoulli does.
    """
    eps = torch.finfo(probs.dtype).eps
    p = probs.clamp(eps, 1 - eps)
    return -(x * p.log() + (1 - x) * torch.log1p(-p)).sum(dim=1)


# ─── Grouper: the topographic kernel W and the padder ────────────────────────
# SPEC §1.4: the topographic latent is
#
#     t = (z + mu) / sqrt(W ⊛ u² + eps)
#
# where W ⊛ u² sums u² over a neighbourhood on a torus and mu is one learned
# scalar. Each capsule of each sequence is a 2-D torus of S frames × cap_dim
# units; the padder wraps it circularly in both directions (the boundary
# condition), and a 'valid' conv2d with the 0/1 kernel W does the sum. A kernel
# of size k covers offsets δ ∈ Δ(k) = {−⌊(k−1)/2⌋, …, ⌊k/2⌋}: a circular pad of
# ⌊(k−1)/2⌋ before and ⌊k/2⌋ after.
#
# Speed: padding and convolving is a linear map of the torus, so the grouper
# applies it once to every basis vector at construction and keeps the result
# as a matrix. W ⊛ u² is then one matmul, whose backward pass on the CPU is
# ~20× faster than conv2d's with an 18×18 kernel, and exactly the same sum.

def topographic_kernel(k_time, k_capsule, n_off_diag=None):
    """The 0/1 kernel W over (time offset δt, unit offset δc), shape (k_time, k_capsule).

    Shifting capsules (n_off_diag given, SPEC §1.4a): W[δt, δc] = 1 where
    |δc − δt| ≤ n_off_diag, so the neighbourhood of unit i at frame τ is unit
    i + δt (± n_off_diag) at frame τ + δt: the window moves along the capsule as
    time advances, which makes one step of the input a Roll of the capsule.
    Stationary capsules (n_off_diag None, §1.4b: Bubbles, L=0, the 2-D map):
    all ones, no shift.
    """
    if n_off_diag is None:
        return torch.ones(k_time, k_capsule)
    dt = torch.arange(k_time) - (k_time - 1) // 2                 # Δ(kT)
    dc = torch.arange(k_capsule) - (k_capsule - 1) // 2           # Δ(kC)
    return ((dc[None, :] - dt[:, None]).abs() <= n_off_diag).float()


def pad_and_sum(tori, kernel):
    """W ⊛ x on tori (M, 1, rows, cols): the padder wraps both axes, then a valid conv sums."""
    k_rows, k_cols = kernel.shape
    # F.pad takes (left, right, top, bottom): the column (capsule) axis first, then rows (time).
    padding = ((k_cols - 1) // 2, k_cols // 2, (k_rows - 1) // 2, k_rows // 2)
    return F.conv2d(F.pad(tori, padding, mode="circular"), kernel[None, None])


class Grouper(nn.Module):
    """(z, u) → t = (z + mu) / sqrt(W ⊛ u² + eps), on (N, d) tensors (SPEC §1.4).

    kernel: W, (kT, kC). The torus is (S frames × cap_dim units) per capsule of
    each sequence; with map_shape = (rows, cols) it is instead each image's
    d units laid out row-major on a rows × cols torus (the 2-D map of Figure 3,
    S = 1, one capsule). Capsules and sequences never mix.
    """

    def __init__(self, kernel, n_transforms, n_caps, cap_dim, mu_init, eps=1e-6, map_shape=None):
        super().__init__()
        self.n_transforms, self.n_caps, self.cap_dim = n_transforms, n_caps, cap_dim
        self.map_shape, self.eps = map_shape, eps
        self.register_buffer("kernel", kernel)                    # (kT, kC)
        torus = map_shape or (n_transforms, cap_dim)
        n = math.prod(torus)
        # Row j holds where unit j's u² lands: v = u² @ torus_matrix.
        basis = torch.eye(n).view(n, 1, *torus)
        self.register_buffer("torus_matrix", pad_and_sum(basis, kernel).view(n, n), persistent=False)
        self.mu = nn.Parameter(torch.tensor(float(mu_init)))

    def to_torus(self, x):
        """(N, d) → (B·n_caps, S·cap_dim): one flattened torus per capsule of each sequence."""
        if self.map_shape is not None:
            return x
        S, caps, dim = self.n_transforms, self.n_caps, self.cap_dim
        x = x.view(-1, S, caps, dim).transpose(1, 2)              # (B, n_caps, S, cap_dim)
        return x.reshape(-1, S * dim)

    def from_torus(self, x):
        """The inverse of to_torus: (B·n_caps, S·cap_dim) → (N, d)."""
        if self.map_shape is not None:
            return x
        S, caps, dim = self.n_transforms, self.n_caps, self.cap_dim
        x = x.view(-1, caps, S, dim).transpose(1, 2)              # (B, S, n_caps, cap_dim)
        return x.reshape(-1, caps * dim)

    def forward(self, z, u):                                      # z, u (N, d)
        v = self.from_torus(self.to_torus(u ** 2) @ self.torus_matrix)   # W ⊛ u², (N, d)
        return (z + self.mu) / torch.sqrt(v + self.eps)           # SPEC §1.4


# ─── The model ───────────────────────────────────────────────────────────────
# SPEC §1.4c: with grouper=None this is the non-topographic
# baseline VAE (t = z, no u-encoder, no mu, KL on z only).

class TVAE(nn.Module):
    """The Topographic VAE: z_encoder, u_encoder, grouper, decoder.

    image_shape: (C, H, W); d: latent units per image (n_caps·cap_dim);
    grouper: a Grouper, or None for the plain VAE baseline.
    """

    def __init__(self, image_shape, d, grouper=None):
        super().__init__()
        n_pixels = math.prod(image_shape)
        self.image_shape, self.d = tuple(image_shape), d
        self.z_encoder = GaussianEncoder(n_pixels, d)
        self.u_encoder = GaussianEncoder(n_pixels, d) if grouper is not None else None
        self.grouper = grouper
        self.decoder = BernoulliDecoder(d, self.image_shape)

    def encode(self, x):
        """x (B, S, C, H, W) → flat images (N, C·H·W) and the posteriors' (mean, logvar) of z and u."""
        x = x.flatten(0, 1).flatten(1)                            # (N, C·H·W), frame index fastest
        q_z = self.z_encoder(x)
        q_u = self.u_encoder(x) if self.u_encoder is not None else None
        return x, q_z, q_u

    def group(self, z, u):
        """t from samples of z and u (t = z for the VAE)."""
        return self.grouper(z, u) if self.grouper is not None else z

    def forward(self, x):
        """One pass of the training objective (SPEC §1.5) on x (B, S, C, H, W).

        Returns a dict of per-image tensors (N,): 'nll' = −log p(x|t), 'kl_z',
        'kl_u' (zero for the VAE), 'loss' = their sum; and 't' (N, d), the
        sampled topographic latent, and 'probs' (N, C·H·W).
        """
        x, (z_mean, z_logvar), q_u = self.encode(x)
        z = reparameterise(z_mean, z_logvar, torch.randn_like(z_mean))
        kl_z = kl_standard_normal(z_mean, z_logvar)
        if q_u is None:
            u, kl_u = None, torch.zeros_like(kl_z)
        else:
            u_mean, u_logvar = q_u
            u = reparameterise(u_mean, u_logvar, torch.randn_like(u_mean))
            kl_u = kl_standard_normal(u_mean, u_logvar)
        t = self.group(z, u)
        probs = self.decoder(t)
        nll = bernoulli_nll(probs, x)
        return {"loss": nll + kl_z + kl_u, "nll": nll, "kl_z": kl_z, "kl_u": kl_u,
                "t": t, "probs": probs}

    @torch.no_grad()
    def log_likelihood(self, x, n_samples):
        """Importance-sampled log p(x) per image, x (B, S, C, H, W) → (B·S,) nats (SPEC §1.6).

            w_k = log p(x|t_k) + log p(z_k) + log p(u_k) − log q(z_k|x) − log q(u_k|x)
            log p̂(x) = logsumexp_k w_k − log K

        The posteriors are the proposals. Since t of one frame depends on u of
        its neighbours, each sample is drawn for the whole sequence at once.
        The reference omitted − log K, so its figures are log K higher.
        """
        x, (z_mean, z_logvar), q_u = self.encode(x)
        K, (N, d) = n_samples, z_mean.shape
        z = reparameterise(z_mean, z_logvar, torch.randn(K, N, d, device=x.device)).view(K * N, d)
        z_mean, z_logvar = z_mean.repeat(K, 1), z_logvar.repeat(K, 1)    # (K·N, d)
        log_w = log_standard_normal(z) - log_normal(z, z_mean, z_logvar)
        u = None
        if q_u is not None:
            u_mean, u_logvar = q_u
            u = reparameterise(u_mean, u_logvar, torch.randn(K, N, d, device=x.device)).view(K * N, d)
            u_mean, u_logvar = u_mean.repeat(K, 1), u_logvar.repeat(K, 1)
            log_w += log_standard_normal(u) - log_normal(u, u_mean, u_logvar)
        probs = self.decoder(self.group(z, u))                    # (K·N, C·H·W); K whole batches
        log_w -= bernoulli_nll(probs, x.repeat(K, 1))
        return torch.logsumexp(log_w.view(K, N), dim=0) - math.log(K)

    @torch.no_grad()
    def sample(self, n_sequences, n_transforms):
        """Decode draws from the prior: z, u ~ N(0, 1) → grouper → decoder (SPEC §1.7).

        Returns probabilities (n_sequences, S, C, H, W); whole sequences are drawn
        because t of a frame depends on u of its neighbours in time.
        """
        device = self.decoder.channel_bias.device
        z = torch.randn(n_sequences * n_transforms, self.d, device=device)
        u = torch.randn_like(z) if self.grouper is not None else None
        probs = self.decoder(self.group(z, u))
        return probs.view(n_sequences, n_transforms, *self.image_shape)

    @torch.no_grad()
    def capsule_traversal(self, x, n_caps, cap_dim):
        """The picture of Figures 1, 4, 6, 22, 23 (SPEC §1.7) for one sequence x (S, C, H, W).

        Returns three image stacks: the S input frames, their reconstructions,
        and the decodings of frame 0's latent rolled within every capsule by
        0, 1, …, cap_dim − 1. An equivariant model makes the last row replay
        the sequence. The latents are computed from the posterior means, so the
        picture does not change from one call to the next.
        """
        _, (z_mean, _), q_u = self.encode(x[None])
        t = self.group(z_mean, q_u[0] if q_u is not None else None)                  # (S, d)
        reconstructions = self.decoder(t).view(-1, *self.image_shape)
        capsules = t[0].view(n_caps, cap_dim)
        rolled = torch.stack([capsules.roll(k, dims=1).flatten() for k in range(cap_dim)])  # (cap_dim, d)
        return x, reconstructions, self.decoder(rolled).view(-1, *self.image_shape)


# ─── Metrics ─────────────────────────────────────────────────────────────────

def equivariance_error(t, n_transforms, n_caps, cap_dim):
    """E_eq of SPEC §1.6 (the paper's Table 1), averaged over the B sequences of t (N, d).

        E_eq = (1/B) Σ_b Σ_{t0<t1} Σ_caps ‖ Roll_{t1−t0}(t̂[b, t0]) − t̂[b, t1] ‖₁

    t̂ is every capsule vector divided by its L2 norm; Roll_k moves unit i to
    i + k (torch.roll). Un-roll every frame by its own index, a[τ] = Roll_−τ(t̂[τ]):
    then Roll_{t1−t0}(t̂[t0]) − t̂[t1] = Roll_t1(a[t0] − a[t1]), and a roll keeps the
    L1 norm, so E_eq sums the L1 distances between all pairs of un-rolled
    frames. A perfectly equivariant code un-rolls to the same vector in every frame.
    """
    S = n_transforms
    t = F.normalize(t.view(-1, S, n_caps, cap_dim), dim=3)        # t̂, (B, S, n_caps, cap_dim)
    frame, unit = torch.arange(S, device=t.device)[:, None], torch.arange(cap_dim, device=t.device)
    source = ((unit + frame) % cap_dim).expand(t.shape[0], n_caps, S, cap_dim).transpose(1, 2)
    unrolled = t.gather(3, source).flatten(2)                     # a: out[τ, i] = t̂[τ, i + τ], (B, S, d)
    distances = torch.cdist(unrolled, unrolled, p=1)              # (B, S, S), symmetric
    return distances.sum(dim=(1, 2)).mean() / 2                   # each pair t0 < t1 once


def capsule_offsets(t, labels, n_caps, cap_dim):
    """Estimated and true transformation offsets per dSprites sequence (SPEC §1.6, Table 2).

    t (N, d) with N = B·S; labels (B, S, n_factors) factor indices per frame.
    For each sequence: the transformed factor f is the one whose index changes
    between frames 0 and 1. For every frame i where f's index is 0, the
    periodic cross-correlation ifft(fft(t[0])·conj(fft(t[i]))) of each capsule
    peaks at the estimated offset; its mode over capsules is the estimate.
    Among qualifying frames we keep the estimate closest to the truth, the
    index of f at frame 0. Returns (factor, estimate, truth), each (B,) long.
    """
    B, S, _ = labels.shape
    t = t.view(B, S, n_caps, cap_dim)
    spectrum = torch.fft.fft(t, dim=3)
    correlation = torch.fft.ifft(spectrum[:, :1] * spectrum.conj(), dim=3).real  # (B, S, n_caps, cap_dim)
    estimate = correlation.argmax(dim=3).mode(dim=2).values                      # (B, S)
    factor = (labels[:, 1] != labels[:, 0]).int().argmax(dim=1)                  # (B,)
    factor_index = labels.gather(2, factor[:, None, None].expand(B, S, 1))[..., 0]  # (B, S)
    truth = factor_index[:, 0]
    distance = (estimate - truth[:, None]).abs().float()
    distance[factor_index != 0] = float("inf")                                   # only frames at index 0
    best = distance.argmin(dim=1)
    return factor, estimate.gather(1, best[:, None])[:, 0], truth


def pearson(a, b):
    """Pearson correlation of two 1-D tensors (nan when either is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a * b).sum() / (a.norm() * b.norm())


def class_selectivity(t, classes, n_classes=10, threshold=0.85):
    """The class-selectivity map of Figure 3 (SPEC §1.7): per unit, the class it prefers, or −1.

    t (N, d) over a test set, classes (N,). For each unit and class c,
    d′ = (mean_c − mean_rest) / sqrt((var_c + var_rest) / 2); a unit is labelled
    c where its largest d′ ≥ threshold (variances without Bessel's correction). Returns (d,) long.
    """
    d_prime = []
    for c in range(n_classes):
        in_c, rest = t[classes == c], t[classes != c]             # (N_c, d), (N − N_c, d)
        d_prime.append((in_c.mean(0) - rest.mean(0))
                       / torch.sqrt((in_c.var(0, correction=0) + rest.var(0, correction=0)) / 2))
    d_prime = torch.stack(d_prime).nan_to_num(nan=-math.inf)      # (n_classes, d); an absent class never wins
    best, label = d_prime.max(dim=0)                              # (d,) each
    return torch.where(best >= threshold, label, torch.full_like(label, -1))


def topographic_agreement(labels, map_shape, n_shuffles=100, generator=None):
    """How topographic a class-selectivity map is (Figure 3): same-class neighbours, against chance.

    labels (d,): each unit's preferred class or −1 (class_selectivity), laid out
    row-major on the rows × cols torus. Among pairs of 4-neighbours that both
    prefer a class, the share that prefer the same one; beside it the same share
    with the units' positions shuffled (mean over n_shuffles permutations). A
    map with no topography scores a ratio of about 1. Returns (share, shuffled share).
    """
    def agreement(grid):                                          # grid (rows, cols)
        same = pairs = 0
        for neighbour in (grid.roll(1, dims=0), grid.roll(1, dims=1)):
            both = (grid >= 0) & (neighbour >= 0)
            same += ((grid == neighbour) & both).sum().item()
            pairs += both.sum().item()
        return same / pairs if pairs else math.nan

    labels = labels.cpu()
    share = agreement(labels.view(map_shape))
    shuffled = [agreement(labels[torch.randperm(len(labels), generator=generator)].view(map_shape))
                for _ in range(n_shuffles)]
    return share, sum(shuffled) / n_shuffles
