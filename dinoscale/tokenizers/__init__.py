"""Visual tokenizers: networks that turn an image into a grid of discrete tokens, the targets of BEiT.

``dvae`` holds BEiT's discrete VAE (a DALL-E-style dVAE trained with the Gumbel-softmax relaxation), its
checkpoint format (``save_tokenizer`` / ``load_tokenizer``) and the Gumbel temperature schedule;
``tools/train_tokenizer.py`` trains one, ``dinoscale.methods.beit`` runs its frozen encoder.
"""
