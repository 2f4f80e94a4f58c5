"""PACS input and output for scoring: DICOMweb in (QIDO-RS, WADO-RS), DICOM SR out (STOW-RS).

``score.score_dicomweb`` is the entry point (``medtransfer score --dicomweb URL``); the other
modules have one job each: ``client`` (the server, bounded timeouts), ``rules`` (series
selection as data, ``series_rules.yaml``), ``listing`` (what to score), ``fetch`` (WADO-RS in a
decode worker) and ``sr`` (the TID 1500 report).
"""
