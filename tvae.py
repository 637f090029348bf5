"""The Topographic VAE, its loss and its metrics, in one file.

Keller & Welling, "Topographic VAEs learn Equivariant Capsules", NeurIPS 2021
(arXiv 2109.01394). The file reads top to bottom in the order the data flows:

  x ─z_encoder─► z ─┐
  x ─u_encoder─► u ─┴─grouper─► t ─decoder─► p(x|t)    then the metrics

A batch of B sequences of S frames is flattened to N = B·S images, frame index
fastest (image n = b·S + l). Every latent is (N, d), d = n_caps·cap_dim, and
reads as (B, S, n_caps, cap_dim): unit i of capsule c at frame l of sequence b.

The model, for one sequence; the indices in (3) wrap, mod S and mod cap_dim:
  (1) z, u ~ N(0, I)                         the prior, d units each
  (2) t = (z + mu) / sqrt(W ⊛ u² + eps)      the topographic latent
  (3) (W ⊛ u²)[l, i] = Σ_{δ,δc} W[δ, δc] · u²[l + δ, i + δc]
      summed within one capsule
  (4) W[δ, δc] = 1 if |δc − δ| ≤ n_off_diag, else 0 (shifting capsules);
      W = 1 everywhere (stationary capsules);
      δ ∈ Δ(kT), δc ∈ Δ(kC), Δ(k) = {−⌊(k−1)/2⌋, …, ⌊k/2⌋}
  (5) −log p(x|t) = −Σ_j [x_j log p_j + (1 − x_j) log(1 − p_j)],
      p = decoder(t)
t is a Gaussian over the root of a sum of squared Gaussians, a Student's-t-like
variable. The paper subtracts mu; the code adds a learned mu, which is the same
family with mu's sign flipped. eps only guards the division.

The window W, kT frames × kC units, in the paper's two numbers:
  L    = kT / (2S), the window's reach along time as a fraction of a capsule
         (MNIST, S = 18: 18/36 = 1/2, 13/36, 5/36; dSprites, S = 15: 15/30,
         10/30, 5/30). A stationary W with kT = 1 is L = 0; with kT > 1 it is
         Bubbles, which pools over time without shifting.
  K_W  = 2·n_off_diag + 1, the window's width in units within one frame (the
         paper's K; written K_W here because K is the number of importance
         samples of (11)).
For an even k, Δ(k) reaches one offset further forward than back:
Δ(4) = {−1, 0, 1, 2}, Δ(18) = {−8, …, 9}.

Topographic: neighbouring units share almost all of their divisor W ⊛ u², so
where it is small they are all large together: their magnitudes correlate
while their signs (from z) stay independent.
Equivariant: the shifting W makes the divisor of unit i at frame l sum u² of
units i + δ (± n_off_diag) at frames l + δ. In the paper's notation t_l is built
from Roll_δ of the neighbours' u² at frames l + δ (with torch.roll's direction,
unit i + δ reaches i by a roll of −δ).
The window slides one unit along the capsule per frame, so a code that rolls one
unit per frame, t_l = Roll_l(t_0), keeps its neighbourhood: a step of the input
becomes a roll of the capsule. The 2-D map of Figure 3 is (3) on an 18×18 torus
of one image's units (rows for l, columns for i; S = 1).

Training. Reparameterised diagonal Gaussian posteriors and the negative ELBO:
  (6) q(z|x) = N(m_z, σ_z²), q(u|x) = N(m_u, σ_u²);
      z = m_z + σ_z ⊙ ε, ε ~ N(0, I)
  (7) KL(N(m, σ²) ‖ N(0, I)) = ½ Σ_units (σ² + m² − 1 − log σ²)
  (8) loss = (1/N) Σ_n [ −log p(x_n|t_n) + KL_z,n + KL_u,n ]

Metrics. t̂ is each capsule divided by its L2 norm; Roll_k moves unit i to i + k
(torch.roll's direction).
  (9)  E_eq = (1/B) Σ_b Σ_{l0<l1} Σ_c ‖Roll_{l1−l0}(t̂[b,l0,c]) − t̂[b,l1,c]‖₁
  (10) w_k = log p(x|t_k) + log p(z_k) + log p(u_k)
             − log q(z_k|x) − log q(u_k|x)
  (11) log p(x) ≈ logsumexp_k w_k − log K,
       z_k, u_k ~ q (K importance samples)
The authors' code leaves out − log K: its figures are log K (2.30 nats for
K = 10) higher. E_eq is in Tables 1 and 2, log p(x) in Table 1. Figure 4's
claim, that rolling frame 0's capsules replays the input, as two numbers per
transformation, this implementation's and not the paper's. Every frame l ≥ 1
is predicted three ways: decode(t_0) (static: nothing moves),
decode(Roll_l t_0) (the roll) and decode(t_l) (the own code, the reference).
  (12) roll gain     = Σ (E_static − E_roll) / Σ E_static,
       own-code gain = Σ (E_static − E_self) / Σ E_static
with E the squared errors of the three predictions against frame l, summed
over frames l ≥ 1 and sequences. 0: rolling is no better than standing
still; equal to the own-code gain: the roll predicts each frame as well as
encoding that frame does. Blur scores well on (12): predicting every frame by
the sequence's mean frame, which replays nothing, scores (S + 1) / (2S) ≈ 0.53
where all frames are equally far apart and decode(t_0) is frame 0. So (13)
counts frames instead:
  (13) roll accuracy = the share of frames l ≥ 1 for which no frame of the
       input sequence is strictly nearer (squared error) to decode(Roll_l t_0)
       than frame l itself
and likewise the static and own-code accuracies. A frame guessed at random
scores about 1/S; one prediction for every l (a mean frame, a blank) at most
1/(S − 1) when no two frames are equal; standing still, where decode(t_0)
is nearest frame 0, scores 0 unless a frame repeats frame 0 (a dSprites
factor that returns to its first value).

Symbols, paper → code:
  z, u, t     z, u, t; (N, d) tensors (the authors' code calls t "s")
  W           kernel = topographic_kernel(kT, kC, n_off_diag), (kT, kC);
              all of (3) as one matrix: Grouper.torus_matrix
  mu, eps     Grouper.mu (one learned scalar), Grouper.eps
  S           n_transforms, frames per sequence (= cap_dim in the sequence
              experiments)
  capsule     cap_dim consecutive units of t, n_caps capsules per image
  L, K_W      group_kernel and n_off_diag, as above
  K           n_samples, the importance samples of (11)

This module imports only torch and the standard library: copy it alone into
lecture material and it runs.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


# ─── Encoders: q(z|x) and q(u|x), Eq. (6) ───
# Two diagonal Gaussians with the same architecture and separate weights. The
# authors write them as a full-image Conv2d followed by 1×1 convolutions: the
# same function (and the same default initialisation, fan_in = C·H·W) as Linear
# layers on the flattened image.

class GaussianEncoder(nn.Module):
    """Flat image (C·H·W) → 3d → 2d → 2d units, read as (mean, log-variance), d each."""

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
    """Eq. (6): a sample of N(mean, exp(logvar)) as a differentiable function of the noise ε."""
    return mean + torch.exp(0.5 * logvar) * noise


def kl_standard_normal(mean, logvar):
    """Eq. (7): KL(N(m, σ²) ‖ N(0, 1)) summed over the last axis. (…, d) → (…)."""
    return 0.5 * (logvar.exp() + mean ** 2 - 1 - logvar).sum(dim=-1)


def log_normal(x, mean, logvar):
    """log N(x; mean, exp(logvar)) summed over the last axis. (…, d) → (…)."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 / logvar.exp()).sum(dim=-1)


def log_standard_normal(x):
    """log N(x; 0, 1) summed over the last axis: the prior of Eq. (1). (…, d) → (…)."""
    return -0.5 * (LOG_2PI + x ** 2).sum(dim=-1)


# ─── Grouper: from (z, u) to the topographic latent t, Eqs. (2)–(4) ───
# First the sum W ⊛ u² of Eq. (3) the plain way, as the authors' code does it:
# a padder wraps each torus circularly, and a 'valid' convolution with W sums
# every window. Then the fast form the grouper trains with: the sum is linear
# in u², so on a torus of n units it is an n × n matrix M (v = u² @ M), and
# applying the plain sum to the n basis tori e_j gives M's rows. W ⊛ u² is
# then one matmul, whose backward pass on the CPU is ~20× faster than
# conv2d's with an 18×18 kernel. test_tvae.py checks the two against each
# other and against Eq. (3) written out term by term.

def window_offsets(k):
    """Δ(k) of Eq. (4), the k offsets −⌊(k−1)/2⌋ … ⌊k/2⌋.

    Δ(4) = −1…2, one more forward than back; Δ(5) = −2…2; Δ(18) = −8…9.
    """
    return range(-((k - 1) // 2), k // 2 + 1)


def topographic_kernel(k_time, k_capsule, n_off_diag=None):
    """The 0/1 kernel W of Eq. (4) over (time offset δ, unit offset δc), shape (kT, kC).

    Shifting capsules (n_off_diag given): W[δ, δc] = 1 where |δc − δ| ≤
    n_off_diag, a band along δc = δ. Stationary capsules (n_off_diag None):
    all ones. Row r of W is the r-th offset of window_offsets(k_time), column
    c the c-th of window_offsets(k_capsule). L and K_W: see the module header.
    """
    if n_off_diag is None:
        return torch.ones(k_time, k_capsule)
    dt = torch.tensor(window_offsets(k_time))[:, None]           # Δ(kT), (kT, 1)
    dc = torch.tensor(window_offsets(k_capsule))[None, :]        # Δ(kC), (1, kC)
    return ((dc - dt).abs() <= n_off_diag).float()


def neighbourhood_sum(u2, kernel):
    """W ⊛ u² of Eq. (3) on tori u2 (M, rows, cols), wrapped: the plain form.

    v[l, i] = Σ W[δ, δc] · u²[l + δ, i + δc]. Rows are frames and columns a
    capsule's units (or the rows and columns of the 2-D map). The padder adds
    ⌊(k−1)/2⌋ wrapped rows (columns) before and ⌊k/2⌋ after, the reach of
    Δ(k); conv2d then computes Σ W[r, c] · padded[l + r, i + c], a
    cross-correlation (W is not flipped), which is Eq. (3) with
    δ = r − ⌊(k−1)/2⌋.
    """
    k_rows, k_cols = kernel.shape
    # F.pad takes (left, right, top, bottom): the column (unit) axis first, then rows (time).
    padding = ((k_cols - 1) // 2, k_cols // 2, (k_rows - 1) // 2, k_rows // 2)
    wrapped = F.pad(u2[:, None], padding, mode="circular")   # (M, 1, rows+kT−1, cols+kC−1)
    return F.conv2d(wrapped, kernel[None, None].to(u2.dtype))[:, 0]   # (M, rows, cols)


class Grouper(nn.Module):
    """(z, u) → t = (z + mu) / sqrt(W ⊛ u² + eps), Eq. (2), on (N, d) tensors.

    kernel: W of Eq. (4), (kT, kC), shifting or stationary (L and K_W: see the
    module header). The torus is S frames × cap_dim units per capsule of each
    sequence; with map_shape = (rows, cols) it is instead each image's d units
    laid out row-major on a rows × cols torus (the 2-D map of Figure 3, S = 1,
    one capsule). Capsules and sequences never mix.
    """

    def __init__(self, kernel, n_transforms, n_caps, cap_dim, mu_init, eps=1e-6, map_shape=None):
        super().__init__()
        self.n_transforms, self.n_caps, self.cap_dim = n_transforms, n_caps, cap_dim
        self.map_shape, self.eps = map_shape, eps
        self.register_buffer("kernel", kernel)                    # W, (kT, kC)
        torus = map_shape or (n_transforms, cap_dim)
        n = math.prod(torus)
        # Row j is the plain sum applied to basis torus e_j: v = u² @ torus_matrix.
        basis = torch.eye(n).view(n, *torus)                      # (n, rows, cols)
        torus_matrix = neighbourhood_sum(basis, kernel).view(n, n)
        self.register_buffer("torus_matrix", torus_matrix, persistent=False)
        self.mu = nn.Parameter(torch.tensor(float(mu_init)))

    def to_torus(self, x):
        """(N, d) → (B·n_caps, S·cap_dim): one flattened torus per capsule of each sequence."""
        if self.map_shape is not None:
            return x                                              # (N, rows·cols) already
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
        v = self.from_torus(self.to_torus(u ** 2) @ self.torus_matrix)   # W ⊛ u², (3), (N, d)
        return (z + self.mu) / torch.sqrt(v + self.eps)           # Eq. (2), (N, d)


# ─── Decoder: p(x|t), Eq. (5) ───
# t (d) → 2d → 3d → C·H·W → sigmoid: a Bernoulli on the pixel intensities in
# [0, 1]. The authors' layers are transposed convolutions, and two of their
# details decide the parameter count and the early training curve:
#   * the last layer has one bias per channel (C values), not one per pixel;
#   * every weight and bias is drawn from U(−1/√f, 1/√f) with f = the layer's
#     OUTPUT units (ConvTranspose2d's fan), not its input units as nn.Linear does.

class BernoulliDecoder(nn.Module):
    """t (N, d) → pixel probabilities (N, C·H·W)."""

    def __init__(self, d, image_shape):
        super().__init__()
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
        logits = logits.unflatten(1, (len(self.channel_bias), -1))    # (N, C, H·W)
        logits = logits + self.channel_bias[:, None]              # one bias per channel
        return torch.sigmoid(logits.flatten(1))                   # (N, C·H·W)


def bernoulli_nll(probs, x):
    """Eq. (5): −log p(x|t) summed over the last axis, (…, C·H·W) → (…).

    x holds intensities in [0, 1] (not binarised). p is clamped to [eps, 1 − eps]
    with eps the float32 machine epsilon, as torch.distributions.Bernoulli does.
    """
    eps = torch.finfo(probs.dtype).eps
    p = probs.clamp(eps, 1 - eps)
    return -(x * p.log() + (1 - x) * torch.log1p(-p)).sum(dim=-1)


# ─── The model ───
# With grouper=None this is the non-topographic baseline VAE of Tables 1 and 2:
# t = z, no u-encoder, no mu, and no u terms in Eqs. (8) and (10).

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
        """x (B, S, C, H, W) → images (N, C·H·W) and the (mean, logvar) of q(z|x) and q(u|x)."""
        x = x.flatten(0, 1).flatten(1)                 # (N, C·H·W), frame index fastest
        q_z = self.z_encoder(x)
        q_u = self.u_encoder(x) if self.u_encoder is not None else None
        return x, q_z, q_u

    def group(self, z, u):
        """t from samples of z and u, Eq. (2) (t = z for the VAE)."""
        return self.grouper(z, u) if self.grouper is not None else z

    def forward(self, x):
        """One pass of the training objective, Eq. (8), on x (B, S, C, H, W).

        Returns a dict of per-image tensors (N,): 'nll' = −log p(x|t), 'kl_z',
        'kl_u' (zero for the VAE), 'loss' = their sum (its mean is Eq. (8)); and
        't' (N, d), the sampled topographic latent, and 'probs' (N, C·H·W).
        The noise of z is drawn before the noise of u.
        """
        x, (z_mean, z_logvar), q_u = self.encode(x)               # (N, C·H·W); (N, d) each
        z = reparameterise(z_mean, z_logvar, torch.randn_like(z_mean))       # (N, d), Eq. (6)
        kl_z = kl_standard_normal(z_mean, z_logvar)                          # (N,), Eq. (7)
        if q_u is None:                                                      # the VAE: no u
            u, kl_u = None, torch.zeros_like(kl_z)                           # kl_u (N,)
        else:
            u_mean, u_logvar = q_u                                           # (N, d) each
            u = reparameterise(u_mean, u_logvar, torch.randn_like(u_mean))   # (N, d), Eq. (6)
            kl_u = kl_standard_normal(u_mean, u_logvar)                      # (N,), Eq. (7)
        t = self.group(z, u)                                                 # (N, d), Eq. (2)
        probs = self.decoder(t)                                              # (N, C·H·W)
        nll = bernoulli_nll(probs, x)                                        # (N,), Eq. (5)
        return {"loss": nll + kl_z + kl_u, "nll": nll, "kl_z": kl_z, "kl_u": kl_u,   # (N,)
                "t": t, "probs": probs}                                      # (N, d), (N, C·H·W)

    @torch.no_grad()
    def log_likelihood(self, x, n_samples):
        """Importance-sampled log p(x) per image, Eqs. (10)–(11): x (B, S, C, H, W) → (B·S,).

        In nats. The posteriors are the proposals; K = n_samples. Since t of
        one frame depends on u of its neighbours, each sample is drawn for the
        whole batch of sequences at once: K noises for z, then K for u.
        """
        x, (z_mean, z_logvar), q_u = self.encode(x)               # (N, C·H·W); (N, d) each
        K, (N, d) = n_samples, z_mean.shape                       # samples, images, units
        noise = torch.randn(K, N, d, device=x.device)
        z = reparameterise(z_mean, z_logvar, noise)                          # (K, N, d)
        log_w = log_standard_normal(z) - log_normal(z, z_mean, z_logvar)     # (K, N)
        u = None                                                             # the VAE: no u
        if q_u is not None:
            u_mean, u_logvar = q_u                                           # (N, d) each
            noise = torch.randn(K, N, d, device=x.device)
            u = reparameterise(u_mean, u_logvar, noise)                      # (K, N, d)
            log_w = log_w + log_standard_normal(u) - log_normal(u, u_mean, u_logvar)   # (K, N)
            u = u.flatten(0, 1)                                              # (K·N, d)
        t = self.group(z.flatten(0, 1), u)              # (K·N, d): K whole batches of sequences
        probs = self.decoder(t).view(K, N, -1)                               # (K, N, C·H·W)
        log_w = log_w - bernoulli_nll(probs, x)                              # (K, N), Eq. (10)
        return torch.logsumexp(log_w, dim=0) - math.log(K)                   # (N,), Eq. (11)

    @torch.no_grad()
    def sample(self, n_sequences, n_transforms):
        """Decode draws from the prior, Eq. (1): z, u ~ N(0, I) → grouper → decoder.

        Returns probabilities (n_sequences, S, C, H, W); whole sequences are drawn
        because t of a frame depends on u of its neighbours in time. z is drawn
        first, then u, each (n_sequences·S, d).
        """
        device = self.decoder.channel_bias.device
        z = torch.randn(n_sequences * n_transforms, self.d, device=device)
        u = torch.randn_like(z) if self.grouper is not None else None
        probs = self.decoder(self.group(z, u))
        return probs.view(n_sequences, n_transforms, *self.image_shape)

    @torch.no_grad()
    def capsule_traversal(self, x, n_caps, cap_dim, generator=None):
        """The picture of Figures 1, 4, 6, 22 and 23 for one sequence x (S, C, H, W).

        Returns three image stacks: the S input frames, their reconstructions,
        and the decodings of frame 0's latent rolled within every capsule by
        0, 1, …, cap_dim − 1 (Roll_k: unit i moves to i + k, as in Eq. (9)).
        An equivariant model makes the last row replay the sequence.
        t is one draw from the posterior, Eq. (6): z's noise, then u's, from
        generator (a CPU torch.Generator; a fixed seed gives the same picture
        every call). It is a draw and not the posterior means because mu is
        large, so the code lies in the size of u, whose mean is near 0: the
        means give W ⊛ u² ≈ 0 in Eq. (2) and a saturated t.
        """
        _, q_z, q_u = self.encode(x[None])                        # (mean, logvar), (S, d) each
        noise = lambda mean: torch.randn(mean.shape, generator=generator).to(mean.device)
        z = reparameterise(*q_z, noise(q_z[0]))                   # (S, d), Eq. (6)
        u = reparameterise(*q_u, noise(q_u[0])) if q_u is not None else None   # VAE: no u
        t = self.group(z, u)                                      # (S, d), Eq. (2)
        reconstructions = self.decoder(t).view(-1, *self.image_shape)
        capsules = t[0].view(n_caps, cap_dim)
        # Roll_k of every capsule of frame 0, k = 0 … cap_dim − 1: (cap_dim, d)
        rolled = torch.stack([capsules.roll(k, dims=1).flatten() for k in range(cap_dim)])
        return x, reconstructions, self.decoder(rolled).view(-1, *self.image_shape)


# ─── Metrics ───
# E_eq, first as Eq. (9) writes it, then the fast form used in training. With
# every frame un-rolled by its own index, a[l] = Roll_−l(t̂[l]), each term of
# Eq. (9) is Roll_l1(a[l0] − a[l1]), and a roll keeps the L1 norm: so E_eq is
# the sum of the L1 distances between all pairs of un-rolled frames, one cdist.

def equivariance_error_by_definition(t, n_transforms, n_caps, cap_dim):
    """E_eq of Eq. (9), pair by pair, averaged over the B sequences of t (N, d). For reading."""
    t_hat = F.normalize(t.view(-1, n_transforms, n_caps, cap_dim), dim=3)   # (B, S, caps, dim)
    total = 0.0
    for l0 in range(n_transforms):
        for l1 in range(l0 + 1, n_transforms):
            total = total + (t_hat[:, l0].roll(l1 - l0, dims=2) - t_hat[:, l1]).abs().sum()
    return total / t_hat.shape[0]


def equivariance_error(t, n_transforms, n_caps, cap_dim):
    """E_eq of Eq. (9) (Tables 1 and 2), averaged over the B sequences of t (N, d): the fast form.

    Each frame is un-rolled by its index (a gather), then the pairwise L1
    distances of the un-rolled frames are summed, each pair once (see above).
    A perfectly equivariant code un-rolls to the same vector in every frame.
    """
    S = n_transforms
    t = F.normalize(t.view(-1, S, n_caps, cap_dim), dim=3)        # t̂, (B, S, n_caps, cap_dim)
    frame = torch.arange(S, device=t.device)[:, None]             # (S, 1)
    unit = torch.arange(cap_dim, device=t.device)                 # (cap_dim,)
    source = ((unit + frame) % cap_dim).expand(t.shape[0], n_caps, S, cap_dim).transpose(1, 2)
    unrolled = t.gather(3, source).flatten(2)           # a: a[l, i] = t̂[l, i + l], (B, S, d)
    distances = torch.cdist(unrolled, unrolled, p=1)              # (B, S, S), symmetric
    return distances.sum(dim=(1, 2)).mean() / 2                   # each pair l0 < l1 once


def roll_scores(decoder, x, t, probs, n_caps, cap_dim):
    """Per sequence, Eq. (12)'s squared errors and Eq. (13)'s hits of the three predictions.

    x (B, S, C, H, W) the input sequences; t (N, d) one posterior sample of
    their codes (Eq. (6)) and probs (N, C·H·W) its decoding, as TVAE.forward
    returns them; decoder maps codes (M, d) to pixel probabilities (M, C·H·W).
    Every frame l ≥ 1 is predicted by decode(t_0) (static), decode(Roll_l t_0)
    (every capsule of frame 0 rolled by l, unit i to i + l, as in Eq. (9) and
    capsule_traversal) and decode(t_l) (its own code), and each prediction is
    scored against the INPUT frame, never the reconstruction:
      errors: squared error summed over pixels and frames (zero exactly when a
        prediction is the frame, whereas the Bernoulli NLL of Eq. (5) has a
        floor, the entropy of the grey values, that would shrink every gain);
      hits: frames for which no input frame is strictly nearer to the
        prediction than frame l (ties are hits: equal frames occur where a
        dSprites factor returns to a value; each distance is computed alone,
        so equal frames give exactly equal distances).
    Returns errors (B, 3) and hits (B, 3), columns static, roll, own.
    """
    B, S = x.shape[:2]
    capsules = t.view(B, S, n_caps, cap_dim)[:, 0]                # t_0, (B, n_caps, cap_dim)
    rolled = torch.stack([capsules.roll(l, dims=2) for l in range(S)], dim=1)   # Roll_l t_0
    predicted = decoder(rolled.view(B * S, -1)).view(B, S, -1)    # (B, S, C·H·W); l = 0: static
    predictions = torch.stack([predicted[:, :1].expand(-1, S - 1, -1), predicted[:, 1:],
                               probs.view(B, S, -1)[:, 1:]], dim=1)   # (B, 3, S−1, C·H·W)
    frames = x.flatten(2)                                         # (B, S, C·H·W)
    distances = torch.stack([((predictions - frames[:, None, j:j + 1]) ** 2).sum(dim=3)
                             for j in range(S)], dim=3)           # (B, 3, S−1, S): to every frame
    to_own_frame = distances[..., 1:].diagonal(dim1=2, dim2=3)    # to frame l itself, (B, 3, S−1)
    errors = ((predictions - frames[:, None, 1:]) ** 2).sum(dim=(2, 3))   # Eq. (12)'s E, (B, 3)
    hits = (to_own_frame <= distances.amin(dim=3)).sum(dim=2)     # Eq. (13)'s counts, (B, 3)
    return errors, hits


def roll_gains(errors):
    """Eq. (12): (roll gain, own-code gain) from roll_scores' errors, summed to (…, 3)."""
    static, roll, own = errors.unbind(dim=-1)
    return (static - roll) / static, (static - own) / static


def capsule_offsets(t, labels, n_caps, cap_dim):
    """Estimated and true transformation offsets per dSprites sequence (Table 2).

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
    correlation = torch.fft.ifft(spectrum[:, :1] * spectrum.conj(), dim=3).real   # (B, S, caps, D)
    estimate = correlation.argmax(dim=3).mode(dim=2).values                       # (B, S)
    factor = (labels[:, 1] != labels[:, 0]).int().argmax(dim=1)                   # (B,)
    factor_index = labels.gather(2, factor[:, None, None].expand(B, S, 1))[..., 0]   # (B, S)
    truth = factor_index[:, 0]
    distance = (estimate - truth[:, None]).abs().float()
    distance[factor_index != 0] = float("inf")                    # only frames at index 0
    best = distance.argmin(dim=1)
    return factor, estimate.gather(1, best[:, None])[:, 0], truth


def pearson(a, b):
    """Pearson correlation of two 1-D tensors (nan when either is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a * b).sum() / (a.norm() * b.norm())


def capsule_correlations(offsets, factor_names):
    """Table 2: per factor, Pearson's r of the estimated and true offsets (None where undefined).

    offsets: capsule_offsets(...) of each batch; factor_names {factor index: name}.
    """
    factor, estimate, truth = (torch.cat(part) for part in zip(*offsets))
    r = {name: pearson(estimate[factor == f], truth[factor == f]).item()
         for f, name in factor_names.items()}
    return {name: value if math.isfinite(value) else None for name, value in r.items()}


def class_selectivity(t, classes, n_classes=10, threshold=0.85):
    """The class-selectivity map of Figure 3: per unit, the class it prefers, or −1.

    t (N, d) over a test set, classes (N,). For each unit and class c,
    d′ = (mean_c − mean_rest) / sqrt((var_c + var_rest) / 2); a unit is
    labelled c where its largest d′ ≥ threshold (variances without Bessel's
    correction). Returns (d,) long.
    """
    d_prime = []
    for c in range(n_classes):
        in_c, rest = t[classes == c], t[classes != c]             # (N_c, d), (N − N_c, d)
        d_prime.append((in_c.mean(0) - rest.mean(0))
                       / torch.sqrt((in_c.var(0, correction=0) + rest.var(0, correction=0)) / 2))
    d_prime = torch.stack(d_prime).nan_to_num(nan=-math.inf)      # (n_classes, d)
    best, label = d_prime.max(dim=0)                 # (d,) each; an absent class (nan) never wins
    return torch.where(best >= threshold, label, torch.full_like(label, -1))


def topographic_agreement(labels, map_shape, n_shuffles=100, generator=None):
    """How topographic a class-selectivity map is (Figure 3): same-class neighbours vs chance.

    labels (d,): each unit's preferred class or −1 (class_selectivity), laid
    out row-major on the rows × cols torus. Among pairs of 4-neighbours that
    both prefer a class, the share that prefer the same one; beside it the
    same share with the units' positions shuffled (mean over n_shuffles
    permutations). A map with no topography scores a ratio of about 1.
    Returns (share, shuffled share).
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
