"""Real federation on Flower (``pip install fedilora[flower]``, flwr 1.42, Python >= 3.11).

- ``fedilora.flower.server_app:app``: the ServerApp (``FederatedTrainer`` with clients on SuperNodes);
- ``fedilora.flower.client_app:app``: the ClientApp (one client's local training and evaluation);
- ``fedilora.flower.loopback``: a SuperLink and SuperNodes on 127.0.0.1 started and stopped by PID, and
  a run's status (``flwr run`` exits 0 even when the run crashed).

The Flower app that ``flwr run`` takes is the ``flower-app/`` folder of the repository.
"""
