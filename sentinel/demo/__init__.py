"""`sentinel demo`: model server, sidecar and phased traffic on one machine."""
