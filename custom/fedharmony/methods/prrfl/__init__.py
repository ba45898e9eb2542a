"""PRR-FL (Chen, Zhu, Yang and Yuan, "Personalized Retrogress-Resilient Framework for Real-World
Medical Federated Learning", MICCAI 2021).

Each site holds a personalized model (never sent, never overwritten) and a deputy (sent, and
replaced by the server's answer). Deputy-enhanced transfer (:mod:`fedharmony.methods.prrfl.deputy`, the
bundle's ``configs/prrfl.json`` overlay) lets the two teach each other each local epoch, in
one of three stages (recover, exchange, sublimate). The server aggregates the deputies with
progressive Fourier aggregation (:mod:`fedharmony.methods.prrfl.fourier_aggregation`): the mean amplitude
spectrum of each weight, of which a share growing from r0 to r1 over the rounds replaces each
deputy's own; the phase stays the site's. Normalization layers stay on the sites. The
personalized models are the result; there is no global model.
"""
