"""DICOM networking: the listener (C-ECHO/C-STORE SCP), its fast receive path, and the sender (C-STORE SCU).

Network peers only ever meet this package; what to do with a received data set is :mod:`dicom_node.ingest`'s
business, what to send comes from :mod:`storage`.
"""
