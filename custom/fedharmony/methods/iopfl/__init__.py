"""IOP-FL inside personalization (Jiang, Yang, Wang, Dou, "IOP-FL: Inside-Outside Personalization for
Federated Medical Image Segmentation", IEEE TMI 2023).

Underneath it is FedAvg. After each round's local training a site updates a model that never
leaves it, ``phi <- a * phi + (1 - a) * theta`` (:mod:`fedharmony.methods.iopfl.personalization`, released
``a = 0.1``), scores it on its validation split and keeps its best. The server writes the model
pool (global + personalized models) for test-time routing on sites outside the federation
(:mod:`fedharmony.methods.iopfl.model_pool`, :mod:`fedharmony.methods.iopfl.routing`).
"""
