// Types for @corelay/client (src/corelay.js).

/** `{channel: last offset seen}`. */
export type Cursor = Record<string, number>;

export type TransportKind = "websocket" | "sse" | "poll";
export type State = "connecting" | "open" | "reconnecting" | "closed";

/** localStorage, or anything with the same two methods. */
export interface StorageAdapter {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

export interface Options {
  /** The gateway's base URL: `https://chat.example.com` (ws/wss is derived for WebSocket). */
  url: string;
  /** A client token (JWT). Either this or `getToken`. */
  token?: string;
  /** Called for a token at connect and again when the server says it expired. */
  getToken?: () => string | Promise<string>;
  /** Transports to try, in order (default: websocket, sse, poll). Two failed opens move to the next. */
  transports?: TransportKind[];
  /** Topics to follow (conversations and the user's own channel arrive without subscribing). */
  channels?: string[];
  /** Where to resume from. */
  cursor?: Cursor;
  /** Persists the cursor and unacknowledged sends across page loads. */
  storage?: StorageAdapter;
  storageKey?: string;
  backoffBaseMs?: number;
  backoffMaxMs?: number;
  connectTimeoutMs?: number;
  /** Liveness when the server does not announce it (SSE): silence longer than heartbeatS + heartbeatTimeoutS reconnects. */
  heartbeatS?: number;
  heartbeatTimeoutS?: number;
  /** On a fallback transport, how often to try WebSocket again. */
  upgradeIntervalMs?: number;
  pollTimeoutS?: number;
  /** Constructors for environments without globals (Node 20: pass `WebSocket` from --experimental-websocket or `ws`). */
  WebSocket?: unknown;
  fetch?: typeof fetch;
}

export interface Message {
  type: "message";
  channel: string;
  offset: number;
  from?: string;
  ts: number;
  body: unknown;
}

export interface Receipt {
  type: "receipt";
  conversation: string;
  offset: number;
  state: "delivered" | "read";
  by: string;
  channel: string;
  channel_offset: number;
}

export interface Notice {
  type: "notice";
  body: unknown;
  channel: string;
  channel_offset: number;
}

export interface Reset {
  type: "reset";
  channel: string;
  offset: number;
}

export interface Sent {
  type: "sent";
  client_id: string;
  conversation: string;
  offset: number;
  ts: number;
}

export interface HistoryPage {
  type: "history";
  conversation: string;
  messages: Message[];
  more: boolean;
}

export interface Events {
  message: Message;
  receipt: Receipt;
  notice: Notice;
  reset: Reset;
  state: { state: State; transport: TransportKind | null };
  error: unknown;
  other: unknown;
}

export declare class Corelay {
  constructor(options: Options);
  readonly state: State;
  readonly transport: TransportKind | null;
  /** Where this client stands in each channel; save it to resume later. */
  readonly cursor: Cursor;
  /** Sends not yet acknowledged by the server. */
  readonly outbox: Array<{ client_id: string; conversation: string; body: unknown }>;
  on<K extends keyof Events>(event: K, fn: (value: Events[K]) => void): () => void;
  off<K extends keyof Events>(event: K, fn: (value: Events[K]) => void): void;
  send(conversation: string, body: unknown): Promise<Sent>;
  subscribe(channels: string[]): void;
  unsubscribe(channels: string[]): void;
  ack(conversation: string, offset: number): void;
  read(conversation: string, offset: number): void;
  history(conversation: string, options?: { before?: number; limit?: number }): Promise<HistoryPage>;
  close(): void;
}

export declare function cursorText(cursor: Cursor, only?: (channel: string) => boolean): string;
export declare function parseCursor(text: string): Cursor;
export declare function backoffDelay(attempt: number, baseMs: number, maxMs: number, random?: () => number): number;

export default Corelay;
