"""Self-supervised methods. Each module declares its networks, views and loss; the engine is shared.

``base`` states the contract every method keeps (``Method``), ``registry`` maps the config's ``method:`` to
a method and builds it (``build_method``), ``views`` holds the multi-crop transform and collate the
joint-embedding methods share, ``two_view`` the step of SimCLR and Barlow Twins. Methods without an EMA teacher
return ``None`` as teacher; evaluation and export then use the student's backbone.
"""
