"""Misbehaving monitor factories for fault tests (imported by the spawned analysis worker)."""

from __future__ import annotations

import os
import time


class _Raising:
    def observe(self, batch):
        raise RuntimeError("monitor exploded on purpose")

    def status(self) -> dict:
        return {"monitor": "raising"}


class _Crashing:
    def observe(self, batch):
        os._exit(3)

    def status(self) -> dict:
        return {}


class _Sleepy:
    def observe(self, batch):
        time.sleep(0.5)
        return []

    def status(self) -> dict:
        return {"monitor": "sleepy"}


def raising(config, model_config):
    return _Raising()


def crashing(config, model_config):
    return _Crashing()


def sleepy(config, model_config):
    return _Sleepy()
