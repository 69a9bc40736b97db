"""Federated LoRA fine-tuning with Flower 1.42 (Message API): only adapter weights travel.

- `client_app`: the hospital side (train on local dialogues, score held-out loss).
- `server_app`: FedAvg of adapters, one checkpoint per round, resume (`app` for `flwr run`).
- `strategy`: FedAvg that waits for every hospital once, survives drop-outs and keeps a round ledger.
- `settings`: run config keys ↔ RunSettings / ServerOptions.
- `hospitals`: which data directory a node trains on (`data-path` node config, or the simulation env).
- `deployment`: start and stop SuperLink, SuperNodes and `flwr run` as whole process trees.

Two ways to run the same apps:
- simulation (`federimed train`): `flwr.simulation.run_simulation` in-process, one virtual SuperNode per
  hospital on Ray; the data directory of partition i comes from FEDERIMED_DATA_DIR/FEDERIMED_HOSPITALS.
- deployment (`federimed server` + `federimed hospital join`): a SuperLink and one SuperNode per hospital,
  each SuperNode started with `--node-config "data-path=DIR"`; the run is submitted with `flwr run .`.
"""
