"""HarmoFL (Jiang, Wang and Dou, "HarmoFL: Harmonizing Local and Global Drifts in Federated Learning
on Heterogeneous Medical Images", AAAI 2022).

Two parts, both in the bundle's ``configs/harmofl.json`` overlay: amplitude normalization
(:mod:`fedharmony.methods.harmofl.harmonize`, the network's first layer: the low-frequency window of each
image's amplitude spectrum is replaced by a target amplitude that the server averages with the
weights) and weight-perturbed training (:mod:`fedharmony.methods.harmofl.perturbation`, the trainer's iteration
function). The server is FedAvg's; the target is a buffer of the model, so it is averaged with
the weights. On a site the method only makes sure the target the model uses is the global one,
and gives the initial model (which has none yet) a target from the site's own images.
"""
